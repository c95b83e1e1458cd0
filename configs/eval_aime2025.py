"""pass@1 and pass@4 of SmolLM2-135M-Instruct on AIME 2025 (I and II, 30 problems): 4 samples at temperature 0.7."""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "aime2025"  # results go to runs/eval_<name>/ (or the training workdir) unless --out is given
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
        source="aime2025", num=-1, seed=0, shuffle=False, system_prompt="",
        instruction=config_dict.placeholder(str),  # None: the source's default (the \\boxed{} instruction)
        options=ml_collections.ConfigDict()))  # reasoning-gym dataset options ('rg:' sources)
    # answer_format "auto": the last \boxed{}, else <answer>, ####, "the answer is" (lenient for small models)
    # sandbox: scoring workers confined (seccomp, memory cap); isolate: a process forked per sample
    # strip_thinking: answers are read after a reasoning model's last </think> (False: the whole completion)
    c.env = ml_collections.ConfigDict(dict(name="math", answer_format="auto", timeout_s=5.0, num_workers=2,
                                           sandbox=True, isolate=True, strip_thinking=True))
    c.eval = ml_collections.ConfigDict(dict(
        n_samples=4, k_values=(1, 4), max_batch_size=64, max_prompt_len=0, truncate_prompts=False,
        correct_threshold=1.0, keep_completions=True, chunk_size=0, resume=True))
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=1024, temperature=0.7, top_p=1.0, top_k=0,
                                                stop_strings=()))  # e.g. ('</answer>',): ends a completion
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return c
