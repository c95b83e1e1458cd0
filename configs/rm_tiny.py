"""Reward model (Bradley–Terry) from a tiny random Llama-family model on GSM8K answer pairs (seconds on a CPU;
used by the tests). Exports an HF LlamaForSequenceClassification folder."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.algorithm = "rm"
    c.seed = 0
    c.max_steps = 20
    c.log_every = 1
    c.val_every = 0  # validation (loss, reward accuracy, margin) every N steps on data.val_fraction of the pairs
    c.export_hf = True
    c.tokenizer = "smollm2"  # a .gguf file, an HF tokenizer folder, or 'smollm2'; '' = from model.path
    c.model = ml_collections.ConfigDict(dict(
        path="",  # HF folder, .gguf file or 'smollm2'; empty: build `init`
        init=dict(family="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-5),
        dtype="float32", compute_dtype="float32", attention_impl="xla", remat=False))
    # A handful of pairs seen for many epochs: a smoke test that the whole path learns, not a benchmark.
    c.data = ml_collections.ConfigDict(dict(  # rows: prompt, chosen, rejected (strings or message lists)
        source="gsm8k_pairs", num_examples=16, val_fraction=0.0, max_len=256, overlong="drop", chat_template="",
        chat_template_kwargs="",  # JSON object of template variables, e.g. {"enable_thinking": false}
        add_eos=True,  # close learned turns with EOS when the template ends them with no special token
        cache=True,  # keep the tokenized rows in WORKDIR/data_cache/: a resumed run does not tokenize them again
        shared_prefix=True,  # the tokens both sides start with run once per pair (data.preference)
        length_buckets=4))  # each batch padded to a rung (4 per doubling) over its longest pair
    # Rows may carry a numeric `margin` (loss -log σ(r_c - r_r - margin), as TRL's RewardTrainer and Llama 2).
    c.rm = ml_collections.ConfigDict(dict(
        center_rewards_coefficient=0.0))  # > 0 adds that x mean (r_c + r_r)^2: scores centred on 0 (TRL suggests 0.01)
    c.train = ml_collections.ConfigDict(dict(batch_size=8, microbatches=1))  # batch_size counts pairs
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=3e-3, warmup_steps=2, schedule="cosine", weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
        final_lr_fraction=0.1))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, keep=2, best_metric="", best_mode="min"))
    c.metrics = ml_collections.ConfigDict(dict(tensorboard=True, wandb_project=""))
    return c
