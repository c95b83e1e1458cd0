"""pass@1 and pass@4 of SmolLM2-135M-Instruct on HumanEval (164 problems): each completion's last ```python block
runs with the problem's tests in the sandboxed scoring pool (no network, no file writes, no new processes)."""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "humaneval"  # results go to runs/eval_<name>/ (or the training workdir) unless --out is given
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
        source="humaneval", num=-1, seed=0, shuffle=False, system_prompt="",
        instruction=config_dict.placeholder(str),  # None: the source's default (reply in a ```python block)
        options=ml_collections.ConfigDict()))
    # answer_format "fenced": the last ```python block (chat models); "raw": the completion continues the prompt
    # timeout_s: the whole program, tests included; memory_limit_mb: each scoring process's address space
    # check_returns / refuse_introspection: hardening against programs that win without solving (environments/code.py)
    # program_packages: the packages (beyond the standard library) a program's own process may read
    # strip_thinking: answers are read after a reasoning model's last </think> (False: the whole completion)
    c.env = ml_collections.ConfigDict(dict(name="code", answer_format="fenced", timeout_s=10.0, num_workers=2,
                                           sandbox=True, isolate=True, memory_limit_mb=4096, check_returns=True,
                                           refuse_introspection=True, program_packages=("numpy",), strip_thinking=True))
    c.eval = ml_collections.ConfigDict(dict(
        n_samples=4, k_values=(1, 4), max_batch_size=64, max_prompt_len=0, truncate_prompts=False,
        correct_threshold=1.0, keep_completions=True, chunk_size=0, resume=True))
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=512, temperature=0.6, top_p=0.95, top_k=0,
                                                stop_strings=()))  # e.g. ('</answer>',): ends a completion
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return c
