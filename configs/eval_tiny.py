"""A tiny random Llama-family model on 4 GSM8K problems (seconds on a CPU; used by the tests)."""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "tiny"  # results go to runs/eval_<name>/ (or the training workdir) unless --out is given
    c.seed = 0
    c.tokenizer = "smollm2"  # '' = from model.path (a workdir's saved tokenizer for training runs)
    c.model = ml_collections.ConfigDict(dict(
        path="",  # HF folder, .gguf file, 'smollm2', or a training workdir; empty: build `init`
        step=-1,  # checkpoint step of a training workdir (-1 = latest)
        init=ml_collections.ConfigDict(dict(
            family="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-5)),
        dtype="float32", compute_dtype="float32", attention_impl="xla", remat=False))
    c.data = ml_collections.ConfigDict(dict(
        chat_template="",  # overrides the tokenizer's; chat_template_kwargs: JSON, e.g. {"enable_thinking": false}
        chat_template_kwargs="",
        source="gsm8k", num=4, seed=0, shuffle=False, system_prompt="",
        instruction=config_dict.placeholder(str),  # None: the source's default (the \\boxed{} instruction)
        options=ml_collections.ConfigDict()))  # reasoning-gym dataset options ('rg:' sources)
    # answer_format "auto": the last \boxed{}, else <answer>, ####, "the answer is" (lenient for small models)
    # sandbox: scoring workers confined (seccomp, memory cap); isolate: a process forked per sample
    # strip_thinking: answers are read after a reasoning model's last </think> (False: the whole completion)
    c.env = ml_collections.ConfigDict(dict(name="math", answer_format="auto", timeout_s=5.0, num_workers=1,
                                           sandbox=True, isolate=True, strip_thinking=True))
    # chunk_size: problems sampled and scored at a time, each chunk's rows written to <results>.rows.jsonl as it is
    # scored (0: a few batches' worth); resume: a run stopped part way goes on from that file's rows
    c.eval = ml_collections.ConfigDict(dict(
        n_samples=2, k_values=(1, 2), max_batch_size=8, max_prompt_len=0, truncate_prompts=False,
        correct_threshold=1.0, keep_completions=True, chunk_size=0, resume=True))
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0,
                                                stop_strings=()))  # e.g. ('</answer>',): ends a completion
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return c
