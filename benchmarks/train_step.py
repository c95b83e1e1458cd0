"""Training throughput (tokens/s) of one optimizer step, jaxrl_llm vs TRL, same CPU, one run: SFT and DPO.

Both frameworks train SmolLM2-135M (random weights from its config, or the real GGUF weights with `--gguf`,
written once as an HF folder that both load; `--tiny` swaps in a 2-layer model of the same vocabulary for a
smoke test) in fp32 with AdamW (b2 0.999, no weight decay), grad clipping 1.0, a constant learning rate, and
gradient checkpointing / remat only with `--remat` (then in both). TRL runs its own `train()` loop
(`SFTTrainer`, `DPOTrainer`, see `_trl_common.py`); jaxrl_llm runs the jitted step that
`python -m jaxrl_llm.train` uses, with donated state, its first call (compile + one step) reported apart.
The first `--warmup` steps of each are not timed; the median of `--steps` timed steps is reported.

- sft: `--batch` rows (`algorithms.sft.make_sft_step` on `sft.collate`'s batch vs `SFTTrainer` on the same
  token ids and loss mask, `completion_only_loss`): `--sft-data random` (default), `--length` random ids with
  every token in the loss; `gsm8k`, the first GSM8K conversations of at most `--length` tokens with the SmolLM2
  chat template and the loss on the assistant's answer only. TRL pads to the batch's longest row and projects
  every position onto the vocabulary; jaxrl_llm pads to the rung over the longest (`--length-buckets`, as
  `data.length_buckets`, 0: to `--length`) and projects only the loss targets' predictors. tokens/step = the
  rows' real tokens.
- dpo: the first `--pairs` GSM8K preference pairs (`data.preference.gsm8k_pairs`, SmolLM2 chat template)
  whose longer side fits in `--max-len` tokens, one batch of them every step (`algorithms.dpo.make_dpo_step`
  vs `DPOTrainer` with a reference model, `precompute_ref_log_probs=False`, same beta and loss type). Both get
  the same token ids (TRL through a word-level stub tokenizer, checked) right-padded to the longest sequence
  of the batch, as TRL's collator pads. tokens/step = the non-pad tokens of all chosen and rejected
  sequences (prompt included in each), the same count for both; a step is a policy forward + backward and a
  reference forward over them. jaxrl_llm runs each pair's shared prefix once (`--shared-prefix full`, its
  default `data.shared_prefix`: the prompt and, in these pairs, the worked solution both sides share),
  `prompt` (only the prompt shared: what pairs whose responses differ from their first token get) or `off`
  (two separate rows per pair, as TRL); in every layout it projects only the completion tokens' predictors onto
  the vocabulary (TRL: every position). Tokens run through the model are printed for each.

    python benchmarks/train_step.py                                # sft and dpo, SmolLM2-135M (minutes a step)
    python benchmarks/train_step.py --algo dpo --pairs 4 --max-len 320 --steps 3 --json /tmp/dpo.json
    python benchmarks/train_step.py --tiny                         # smoke test: about a minute when idle
    python benchmarks/train_step.py --algo dpo --gguf --shared-prefix prompt --no-trl
"""

from __future__ import annotations

import argparse
import dataclasses
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _trl_common import Pair, time_trl_dpo, time_trl_sft  # noqa: E402
from forward import LLAMA_1B, SMOLLM2_135M, cpu_name, forward_flops_per_token, gguf_path, peak_flops  # noqa: E402  (same model definition as the forward benchmark)

from jaxrl_llm import models, parallel  # noqa: E402
from jaxrl_llm.algorithms import sft  # noqa: E402
from jaxrl_llm.algorithms.dpo import make_dpo_step  # noqa: E402
from jaxrl_llm.algorithms.sft import make_sft_step  # noqa: E402
from jaxrl_llm.data import preference  # noqa: E402
from jaxrl_llm.optim import make_optimizer  # noqa: E402

TINY = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
# Size options: (default, default with --tiny (a smoke test of about a minute on an idle 2-core CPU), help).
SIZES = {"batch": (4, 2, "sft: rows per step"), "length": (256, 64, "sft: tokens a row"),
         "pairs": (4, 2, "dpo: preference pairs per step"), "max_len": (320, 160, "dpo: longest prompt + completion"),
         "steps": (4, 2, "timed steps (after warm-up)")}
OPT = {"lr": 1e-5, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0}


# ---------------------------------------------------------------------------------------------- weights
def build_weights(folder: str, tiny: bool, gguf: bool, shape: dict | None = None) -> str:
    """Write the model both frameworks load to `folder`; returns a description of the weights."""
    if gguf:
        path = gguf_path()
        if path is not None:
            cfg, params = models.load_pretrained(path, dtype=jnp.float32)
            models.save_pretrained(cfg, params, folder)
            return f"SmolLM2 GGUF {os.path.basename(path)} (dequantised, exported to an HF folder)"
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**(TINY if tiny else shape or SMOLLM2_135M))
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return "random (HF init, seed 0), " + ("tiny 2-layer test model" if tiny else
                                           "Llama-3.2-1B config" if shape is LLAMA_1B else "SmolLM2-135M config")


# ---------------------------------------------------------------------------------------------- jaxrl_llm
class JaxRun:
    """Model, optimizer and state placed as `jaxrl_llm.train.run` places them (mesh over the local devices,
    sharded params, jit with the same in/out shardings), so the step compiles once, as in training."""

    def __init__(self, folder: str, steps: int, remat: bool, compute_dtype: str = "float32", logits_chunk: int = 0):
        self.mesh, self.rules = parallel.make_mesh(1, -1, 1), parallel.ShardingRules()
        cfg, params = models.load_pretrained(folder, mesh=self.mesh, rules=self.rules)  # fp32 master weights
        self.cfg = dataclasses.replace(cfg, remat=remat, compute_dtype=compute_dtype, logits_chunk=logits_chunk)
        self.opt, _ = make_optimizer(OPT["lr"], steps, schedule="constant", grad_clip=OPT["grad_clip"],
                                     b1=OPT["b1"], b2=OPT["b2"], eps=OPT["eps"], weight_decay=OPT["weight_decay"])
        with jax.set_mesh(self.mesh):
            self.state = {"params": params, "opt_state": jax.jit(self.opt.init)(params), "step": jnp.int32(0)}
            self.ref_params = jax.tree.map(jnp.copy, params)  # own buffers: the state is donated

    def run(self, step_fn, batch: dict[str, np.ndarray], batch_axes: dict, ref_params, steps: int, warmup: int
            ) -> dict[str, Any]:
        """The first call (compile + one step) is timed apart and counts as the first warm-up step."""
        batch_sh = {k: self.rules.sharding(self.mesh, batch_axes[k], v.shape) for k, v in batch.items()}
        p_sh = models.param_shardings(self.cfg, self.mesh, self.rules)
        with jax.set_mesh(self.mesh):
            step = jax.jit(step_fn, donate_argnums=0, in_shardings=(None, batch_sh, None),
                           out_shardings=({"params": p_sh, "opt_state": None, "step": None}, None))
            batch = jax.device_put(batch, batch_sh)
            state, losses, times = self.state, [], []
            t0 = time.perf_counter()
            step = step.lower(state, batch, ref_params).compile()
            memory = step.memory_analysis()  # XLA's compiled temporaries: activations, logits, gradients
            state, m = step(state, batch, ref_params)
            jax.block_until_ready(m)
            compile_s = time.perf_counter() - t0
            losses.append(float(m["loss"]))
            for i in range(steps + warmup - 1):
                t0 = time.perf_counter()
                state, m = step(state, batch, ref_params)
                jax.block_until_ready(m)
                if i >= warmup - 1:
                    times.append(time.perf_counter() - t0)
                losses.append(float(m["loss"]))
        return {"step_s": statistics.median(times), "times": times, "compile_s": compile_s, "losses": losses,
                "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
                "params": models.num_params(self.cfg), "cfg": self.cfg}


def sft_config(length: int, length_buckets: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(data=dict(max_len=length, length_buckets=length_buckets)))


def time_jax_sft(folder: str, batch: dict[str, np.ndarray], steps: int, warmup: int, remat: bool,
                 compute_dtype: str = "float32", logits_chunk: int = 0) -> dict[str, Any]:
    r = JaxRun(folder, steps + warmup, remat, compute_dtype, logits_chunk)
    return r.run(make_sft_step(r.cfg, r.opt, 1, r.rules), batch, sft.ALGORITHM.batch_axes, None, steps, warmup)


def sft_rows(source: str, batch: int, length: int, vocab: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`batch` SFT rows (token ids, loss mask). random: `length` random ids, every token in the loss. gsm8k: the
    first GSM8K conversations (question -> worked answer, the SmolLM2 chat template, loss on the assistant turn
    only, as `python -m jaxrl_llm.train` builds them) of at most `length` tokens."""
    if source == "random":
        ids = np.random.default_rng(0).integers(3, vocab, (batch, length)).astype(np.int32)
        return [(r, np.ones_like(r)) for r in ids]
    from jaxrl_llm.data.chat import to_messages, tokenize_conversation
    from jaxrl_llm.data.sources import load_rows
    from jaxrl_llm.models.gguf_io import smollm2_gguf_path

    tok = models.load_tokenizer(smollm2_gguf_path())
    rows = []
    for i, row in enumerate(load_rows("gsm8k")):
        ids, mask = tokenize_conversation(tok, to_messages(row, i), index=i)
        if len(ids) <= length:
            rows.append((np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
            if len(rows) == batch:
                return rows
    raise SystemExit(f"only {len(rows)} GSM8K conversations fit in --length {length}; asked for --batch {batch}")


def dpo_config(beta: float, loss_type: str) -> ml_collections.ConfigDict:
    """The `dpo` and `train` blocks of a run config (as configs/dpo_smollm2.py, one microbatch). TRL's IPO
    length-averages the log-ratios, which is our `average_log_probs`."""
    return ml_collections.ConfigDict(dict(
        dpo=dict(beta=beta, loss_type=loss_type, label_smoothing=0.0, average_log_probs=loss_type == "ipo",
                 preference_weight=1.0, sft_weight=0.0, sft_average_log_probs=False),
        train=dict(microbatches=1)))


def time_jax_dpo(folder: str, batch: dict[str, np.ndarray], steps: int, warmup: int, remat: bool, beta: float,
                 loss_type: str, compute_dtype: str = "float32", logits_chunk: int = 0) -> dict[str, Any]:
    r = JaxRun(folder, steps + warmup, remat, compute_dtype, logits_chunk)
    step_fn = make_dpo_step(r.cfg, r.opt, dpo_config(beta, loss_type), r.rules)
    return r.run(step_fn, batch, preference.BATCH_AXES, r.ref_params, steps, warmup)


# ---------------------------------------------------------------------------------------------- DPO data
def split_pair(pair: preference.PreferencePair) -> Pair | None:
    """(prompt, chosen completion, rejected completion) ids: the completion is the loss-masked span of each
    side, the prompt what precedes it (the same on both sides). None when that layout does not hold."""
    out = []
    for ids, mask in ((pair.chosen_ids, pair.chosen_mask), (pair.rejected_ids, pair.rejected_mask)):
        on = np.flatnonzero(mask)
        if not len(on) or not mask[on[0]: on[-1] + 1].all():
            return None
        out.append((ids[: on[0]], ids[on[0]: on[-1] + 1]))
    (prompt, chosen), (prompt_r, rejected) = out
    return (prompt, chosen, rejected) if np.array_equal(prompt, prompt_r) else None


def dpo_pairs(num_pairs: int, max_len: int) -> tuple[list[Pair], int, int]:
    """The first `num_pairs` GSM8K pairs that fit in `max_len` tokens; (pairs, common last token, pad id)."""
    from jaxrl_llm.models.gguf_io import smollm2_gguf_path

    tok = models.load_tokenizer(smollm2_gguf_path())
    pairs: list[Pair] = []
    for i, row in enumerate(preference.gsm8k_pairs()):
        split = split_pair(preference.tokenize_pair(tok, *preference.to_preference(row, i), index=i))
        if split is not None and len(split[0]) + max(len(split[1]), len(split[2])) <= max_len:
            pairs.append(split)
            if len(pairs) == num_pairs:
                break
    if len(pairs) < num_pairs:
        raise SystemExit(f"only {len(pairs)} GSM8K pairs fit in --max-len {max_len}; asked for --pairs {num_pairs}")
    last = {int(c[-1]) for _, c, _ in pairs} | {int(r[-1]) for _, _, r in pairs}
    if len(last) != 1:
        raise SystemExit(f"the completions end in different tokens {sorted(last)}; TRL would append an EOS")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return pairs, last.pop(), int(pad)


def dpo_batch(pairs: list[Pair], pad_id: int) -> dict[str, np.ndarray]:
    """[P, 2, T] (0 chosen, 1 rejected) right-padded to the longest sequence, as TRL's collator pads."""
    T = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
    ids = np.full((len(pairs), 2, T), pad_id, np.int32)
    attn, loss = np.zeros_like(ids), np.zeros_like(ids)
    for i, (p, c, r) in enumerate(pairs):
        for side, comp in enumerate((c, r)):
            n = len(p) + len(comp)
            ids[i, side, :n] = np.concatenate([p, comp])
            attn[i, side, :n] = 1
            loss[i, side, len(p): n] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def dpo_shared_batch(pairs: list[Pair], pad_id: int, prompt_only: bool) -> dict[str, np.ndarray]:
    """The same pairs in the shared-prefix layout (`data.preference.collate_shared`), padded to the longest prefix
    and suffix of the batch, as the plain batch is padded to its longest row (training pads to the data set's
    longest, rounded up to 8); the prefix is what both sides start with, or the prompt alone with `prompt_only`."""
    full = []
    for p, c, r in pairs:
        sides = [(np.concatenate([p, x]), np.r_[np.zeros(len(p), np.int32), np.ones(len(x), np.int32)]) for x in (c, r)]
        full.append(preference.PreferencePair(*sides[0], *sides[1]))
    lens = [len(p) for p, _, _ in pairs] if prompt_only else [preference.shared_prefix_len(x) for x in full]
    return preference.collate_shared(preference.split_pairs(full, lens, multiple=1), pad_id)


def model_tokens(batch: dict[str, np.ndarray]) -> int:
    """Tokens (pads included) one forward runs through the transformer for this batch."""
    if "prefix_ids" in batch:
        return batch["prefix_ids"].size + batch["suffix_ids"].size
    return batch["input_ids"].size


def real_tokens(batch: dict[str, np.ndarray]) -> int:
    """Non-pad tokens one forward runs through the transformer for this batch."""
    if "prefix_mask" in batch:
        return int(batch["prefix_mask"].sum() + batch["suffix_mask"].sum())
    return int(batch["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------- report
def environment(weights: str, load_before: float) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("jax", "torch", "transformers", "trl"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {**versions, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "cpu": cpu_name(),
            "load_average_before": load_before, "weights": weights, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            # Host allocator settings apply to both trainers (one process); see benchmarks/README.md.
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""), "LD_PRELOAD": os.environ.get("LD_PRELOAD", "")}


def report(title: str, ours: dict, trl: dict | None, tokens: int, flops: dict[str, float], peak: float) -> None:
    """flops: each trainer's model FLOPs a step (of the tokens it runs through the model), for MFU."""
    temp = f", compiled temporaries {ours['temp_bytes'] / 2**30:.2f} GiB" if ours.get("temp_bytes") else ""
    print(f"\n{title}, median of {len(ours['times'])} steps (jax compile + first step {ours['compile_s']:.1f}s"
          f"{temp})\n")
    head = "| trainer | s/step | tokens/s |" + (" MFU |" if peak else "")
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for name, r in (("jaxrl_llm", ours), ("TRL", trl)):
        if r:
            mfu = f" {flops[name] / r['step_s'] / peak:.1%} |" if peak else ""
            label = f"TRL ({r['precision']})" if name == "TRL" and "precision" in r else name
            print(f"| {label} | {r['step_s']:.3f} | {tokens / r['step_s']:,.0f} |{mfu}")
    if trl:
        print(f"\njax/TRL tokens/s: {trl['step_s'] / ours['step_s']:.2f}x (> 1: jaxrl_llm faster)")
        if trl["losses"]:
            print(f"loss, first and last step: jaxrl_llm {ours['losses'][0]:.4f} -> {ours['losses'][-1]:.4f}, "
                  f"TRL {trl['losses'][0]:.4f} -> {trl['losses'][-1]:.4f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", choices=("sft", "dpo", "both"), default="both")
    ap.add_argument("--tiny", action="store_true", help="2-layer, width-64 model (SmolLM2 vocab): smoke test")
    ap.add_argument("--model", choices=("smollm2", "llama1b"), default="smollm2",
                    help="the model's shape (random weights; llama1b: Llama-3.2-1B's, a GPU size)")
    ap.add_argument("--gguf", action="store_true", help="real SmolLM2 weights from the GGUF")
    ap.add_argument("--remat", action="store_true", help="jaxrl_llm remat and TRL gradient checkpointing")
    ap.add_argument("--logits-chunk", type=int, default=0,
                    help="jaxrl_llm's model.logits_chunk: positions projected onto the vocabulary at a time (0: all)")
    for name, (full, tiny, what) in SIZES.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                        help=f"{what} (default {full}; {tiny} with --tiny)")
    ap.add_argument("--sft-data", choices=("random", "gsm8k"), default="random",
                    help="sft rows: random ids, all in the loss; gsm8k: chat conversations, loss on the answers")
    ap.add_argument("--length-buckets", type=int, default=4,
                    help="sft: data.length_buckets, rungs per doubling of the padded width (0: pad to --length)")
    ap.add_argument("--beta", type=float, default=0.1, help="dpo beta")
    ap.add_argument("--dpo-loss", choices=("sigmoid", "ipo"), default="sigmoid")
    ap.add_argument("--shared-prefix", choices=("full", "prompt", "off"), default="full",
                    help="dpo: jaxrl_llm runs the prefix both sides share once (default), the prompt only, or not")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1; jax's includes compile)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--trl-defaults", action="store_true",
                    help="TRL with its configs' own bf16 and gradient-checkpointing defaults instead of fp32 without "
                         "checkpointing (jaxrl_llm keeps fp32 and --remat as given)")
    ap.add_argument("--json", default="")
    ap.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="jaxrl_llm's model.compute_dtype (master weights and optimizer state stay fp32)")
    ap.add_argument("--peak-flops", type=float, default=0.0,
                    help="device peak FLOP/s for MFU (default: looked up by device kind on a GPU)")
    a = ap.parse_args(argv)
    for name, (full, tiny, _) in SIZES.items():
        if getattr(a, name) is None:
            setattr(a, name, tiny if a.tiny else full)
    if a.warmup < 1 or a.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    if a.tiny and a.gguf:
        ap.error("--tiny and --gguf exclude each other")
    if a.gguf and a.model != "smollm2":
        ap.error("--gguf holds SmolLM2's weights: only with --model smollm2")
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
        shape = LLAMA_1B if a.model == "llama1b" else SMOLLM2_135M
        weights = build_weights(folder, a.tiny, a.gguf, shape)
        out["environment"] = env = environment(weights, load_before)
        print(", ".join(f"{k} {v}" for k, v in env.items()))
        fp32 = (f"{'fp32' if a.compute_dtype == 'float32' else 'bf16 compute'}{', remat' if a.remat else ''}"
                f"{f', logits_chunk {a.logits_chunk}' if a.logits_chunk else ''}")
        peak = a.peak_flops or (peak_flops(jax.devices()[0].device_kind, a.compute_dtype) or 0.0
                                if jax.default_backend() == "gpu" else 0.0)
        if a.algo in ("sft", "both"):
            rows = sft_rows(a.sft_data, a.batch, a.length, (TINY if a.tiny else shape)["vocab_size"])
            batch = sft.collate(rows, sft_config(a.length, a.length_buckets), 0)
            ours = time_jax_sft(folder, batch, a.steps, a.warmup, a.remat, a.compute_dtype, a.logits_chunk)
            cfg = ours.pop("cfg")
            trl = None if a.no_trl else time_trl_sft(folder, rows, a.steps, a.warmup, OPT, a.remat, a.trl_defaults)
            tokens, longest = sum(len(ids) for ids, _ in rows), max(len(ids) for ids, _ in rows)
            targets = int(batch["target_weight"].sum())
            out["sft"] = {"jaxrl_llm": ours, "trl": trl, "tokens_per_step": tokens, "loss_targets": targets,
                          "model_tokens": {"jaxrl_llm": batch["input_ids"].size, "trl": len(rows) * longest},
                          "projected_positions": {"jaxrl_llm": batch["target_index"].size,
                                                  "trl": len(rows) * longest}}
            print(f"\nSFT per step: {tokens} real tokens, {targets} loss targets; through the model jaxrl_llm "
                  f"{batch['input_ids'].shape} (vocabulary projection at {batch['target_index'].size} positions), "
                  f"TRL ({len(rows)}, {longest}) (projection at every position)")
            report(f"SFT ({ours['params'] / 1e6:.1f}M params), {fp32}, {a.sft_data} rows: batch {a.batch}, "
                   f"{tokens} tokens", ours, trl, tokens,
                   {"jaxrl_llm": 3 * tokens * forward_flops_per_token(cfg, batch["input_ids"].shape[1]),
                    "TRL": 3 * tokens * forward_flops_per_token(cfg, longest)}, peak)
        if a.algo in ("dpo", "both"):
            pairs, eos_id, pad_id = dpo_pairs(a.pairs, a.max_len)
            batch = dpo_batch(pairs, pad_id)
            ours_batch = batch if a.shared_prefix == "off" else dpo_shared_batch(pairs, pad_id,
                                                                                 a.shared_prefix == "prompt")
            # the loss-target lists DPO's collate adds: only the positions predicting a completion token are
            # projected onto the vocabulary (`preference.pair_targets`)
            ours_batch = {**ours_batch, **preference.pair_targets(ours_batch)}
            assert preference.pair_tokens(ours_batch) == preference.pair_tokens(batch)
            ours = time_jax_dpo(folder, ours_batch, a.steps, a.warmup, a.remat, a.beta, a.dpo_loss,
                                a.compute_dtype, a.logits_chunk)
            cfg = ours.pop("cfg")
            trl = None if a.no_trl else time_trl_dpo(folder, pairs, eos_id, pad_id, a.max_len, a.steps, a.warmup,
                                                     OPT, a.remat, a.beta, a.dpo_loss, a.trl_defaults)
            tokens, T = int(batch["attention_mask"].sum()), batch["input_ids"].shape[-1]
            out["dpo"] = {"jaxrl_llm": ours, "trl": trl, "tokens_per_step": tokens, "padded_length": T,
                          "loss_tokens_per_step": int(batch["loss_mask"].sum()), "shared_prefix": a.shared_prefix,
                          "model_tokens": {"jaxrl_llm": model_tokens(ours_batch), "trl": model_tokens(batch)}}
            print(f"\nDPO tokens run through the model per forward (pads included): jaxrl_llm "
                  f"{model_tokens(ours_batch)} (--shared-prefix {a.shared_prefix}), TRL {model_tokens(batch)}")
            # policy forward + backward (3 forwards' FLOPs) and the reference forward, over the real tokens each
            # runs through the model (with the shared prefix jaxrl_llm runs fewer)
            report(f"DPO {a.dpo_loss} beta {a.beta} ({ours['params'] / 1e6:.1f}M params), {fp32}, {a.pairs} "
                   f"GSM8K pairs padded to {T} ({tokens} real tokens of chosen + rejected per step, "
                   f"{out['dpo']['loss_tokens_per_step']} of them completion)", ours, trl, tokens,
                   {"jaxrl_llm": 4 * real_tokens(ours_batch) * forward_flops_per_token(cfg, T),
                    "TRL": 4 * tokens * forward_flops_per_token(cfg, T)}, peak)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
