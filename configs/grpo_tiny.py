"""GRPO of a tiny random Llama-family model on a toy format task (seconds per step on a CPU; used by the tests).

The reward is 1 when the completion contains the letter "k": 4% of the SmolLM2 vocabulary's tokens do, and the
peaked random policy (init_std=0.5) hits it in about 28% of its 8-token completions; learnable within a few steps,
which makes it a real (seeded) learning test of the whole GRPO path.

Adam's eps is 1e-4, not 1e-8: every one of the 49k tied embedding rows gets a tiny gradient through the softmax,
and with eps 1e-8 Adam's first updates are about lr x sign(g) on all of them, a large random change of the
policy (KL in the thousands after one update at lr 1e-2) that swamps the reward signal. With eps 1e-4 and
lr 3e-3, the mean reward of seed 0 goes from 0.25 (steps 1-3) to 0.63 (steps 6-8) on one CPU and to 0.42 on another
(float round-off in this peaked policy samples other tokens once the runs part); the signal of this toy task is
weak (one "k" token among 8 earns the reward). Over 16 steps (what the test runs) seeds 0-3 all reach 0.9-1.0.
"""

import ml_collections
from ml_collections import config_dict

from jaxrl_llm.algorithms.grpo import grpo_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.algorithm = "grpo"
    c.seed = 0
    c.max_steps = 8
    c.log_every = 1
    c.export_hf = False
    c.val_every = 0  # > 0: evaluate on `eval` every val_every steps (metrics val_*)
    c.tokenizer = "smollm2"  # a .gguf file, an HF tokenizer folder, or 'smollm2'; '' = from model.path
    c.model = ml_collections.ConfigDict(dict(
        path="",  # HF folder, .gguf file or 'smollm2'; empty: build `init`
        init=dict(family="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-5),
        init_std=0.5,  # a peaked random policy (mean token log-prob about -4.5), so GRPO has choices to reinforce
        dtype="float32", compute_dtype="float32", attention_impl="xla", remat=False,
        logits_chunk=0))  # > 0: project onto the vocabulary this many positions at a time (less memory)
    c.data = ml_collections.ConfigDict(dict(
        source="rg:chain_sum",  # gsm8k | aime2025 | champ | rg:<reasoning-gym dataset> | a .jsonl file
        num_examples=64, options=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
        system_prompt="", instruction=config_dict.placeholder(str),  # None: the source's default instruction
        chat_template="",
        chat_template_kwargs="",  # JSON object of template variables, e.g. {"enable_thinking": false}
        max_prompt_len=96, overlong="drop"))  # prompts over max_prompt_len: drop | truncate
    c.env = ml_collections.ConfigDict(dict(name="format", pattern="k"))
    c.rollout = ml_collections.ConfigDict(dict(
        num_prompts=8, group_size=4, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0,
        stop_token_ids=(), max_batch_size=0,  # stop ids beyond the model's and tokenizer's eos; 0 = one batch
        stop_strings=(),  # e.g. ("</answer>",): a completion ends with the first token that completes one
        sampling_layout="",  # "" = the trainer's; "tensor": weights whole on each fsdp device while sampling
        # multi-turn (env with step(), e.g. number_guess): up to max_turns generations per episode; max_total_tokens
        # bounds all tokens after the prompt (0: max_new_tokens x max_turns + 32 per observation)
        max_turns=1, max_total_tokens=0))
    c.grpo = grpo_config(kl_coef=0.01)  # every key with its default: jaxrl_llm/algorithms/grpo.py grpo_config
    c.train = ml_collections.ConfigDict(dict(batch_size=16, microbatches=2))  # rollouts per optimizer update
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-4, grad_clip=1.0,
        final_lr_fraction=1.0))
    c.eval = ml_collections.ConfigDict(dict(source="rg:chain_sum", num_examples=8, seed=1, n_samples=2,
                                            temperature=1.0, top_p=1.0, top_k=0,
                                            options=dict(min_terms=2, max_terms=2)))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.metrics = ml_collections.ConfigDict(dict(tensorboard=True, wandb_project=""))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, keep=2, best_metric="", best_mode="max"))
    return c
