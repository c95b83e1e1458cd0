"""Greedy pass@1 on 200 problems of the main job's task (reasoning-gym chain_sum, single digits), for SmolLM2 as
shipped or for a trained run: `--config.model.path runs/demo` (its latest checkpoint; model.step picks another).

The problems come from seed 1, the training prompts from seed 0; with only a few hundred distinct single-digit
problems some overlap is unavoidable, so this measures the skill on the task, not generalisation to new tasks.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "demo"  # results: runs/eval_<name>/ (or the training workdir) unless --out is given
    c.seed = 0
    c.tokenizer = ""  # '' = from model.path (a workdir's saved tokenizer for training runs)
    c.model = ml_collections.ConfigDict(dict(
        path="smollm2",  # HF folder, .gguf file, 'smollm2', or a training workdir; empty: build `init`
        step=-1,  # checkpoint step of a training workdir (-1 = latest)
        init=ml_collections.ConfigDict(), dtype="float32", compute_dtype="float32", attention_impl="xla",
        remat=False))
    c.data = ml_collections.ConfigDict(dict(
        chat_template="",  # overrides the tokenizer's; chat_template_kwargs: JSON, e.g. {"enable_thinking": false}
        chat_template_kwargs="",
        source="rg:chain_sum", num=200, seed=1, shuffle=False, system_prompt="",
        instruction="Reply with only the final number.",
        options=ml_collections.ConfigDict(dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1))))
    # sandbox: scoring workers confined (seccomp, memory cap); isolate: a process forked per sample
    # strip_thinking: answers are read after a reasoning model's last </think> (False: the whole completion)
    c.env = ml_collections.ConfigDict(dict(name="reasoning_gym", answer_format=r"(-?\d+)", num_workers=1,
                                           timeout_s=10.0, sandbox=True, isolate=True, strip_thinking=True))
    c.eval = ml_collections.ConfigDict(dict(
        n_samples=1, k_values=(1,), max_batch_size=64, max_prompt_len=0, truncate_prompts=False,
        correct_threshold=1.0, keep_completions=True, chunk_size=0, resume=True))
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=16, temperature=0.0, top_p=1.0, top_k=0,
                                                stop_strings=()))  # e.g. ('</answer>',): ends a completion
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return c
