"""Forward-pass throughput (tokens/s) of SmolLM2-135M: jaxrl_llm vs HF PyTorch, side by side, on one machine.

For every (batch, length) cell both frameworks run a full causal-LM forward (all-ones attention mask, full
[B, T, V] fp32/bf16 logits) on the same weights; the table gives tokens/s for each, the ratio jax/torch,
and the one-off XLA compile time (never included in the throughput). On a GPU it also reports MFU.

    python benchmarks/forward.py                                  # default grid, random weights, fp32
    python benchmarks/forward.py --batches 1,8 --lengths 256 --repeats 5 --json /tmp/forward.json
    python benchmarks/forward.py --dtype bfloat16 --attention fused
    python benchmarks/forward.py --gguf                           # the real SmolLM2 weights, if available

Weights: by default an HF `LlamaForCausalLM` with random weights is built from the SmolLM2-135M config,
written with `save_pretrained` to a temp dir and the same folder is loaded with `models.load_pretrained`.
With `--gguf` the real SmolLM2 GGUF (`jaxrl_llm.models.gguf_io.smollm2_gguf_path`) is loaded into
jaxrl_llm and exported with `models.save_pretrained` for HF, so both again run identical weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import models

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json).
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
)
# A Llama-3.2-1B-shaped model (its config.json: 1.24B parameters, 128k vocabulary, 8 kv heads of 64), random
# weights: on a GPU, where SmolLM2's 135M parameters leave a decode step mostly kernel launches, a size at
# which memory bandwidth and matrix units are the limit.
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
)

# Dense peak FLOP/s per device kind (no sparsity). bf16/fp16: tensor cores; float32: TF32 tensor cores, which
# is what XLA (default matmul precision) and torch (with allow_tf32) use on Ampere/Hopper for fp32 matmuls.
# First matching substring of `jax.devices()[0].device_kind` wins; PCIe variants before the generic name.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494.5e12}),  # SXM
    ("H200", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("GH200", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
)


def forward_flops_per_token(cfg: models.ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one forward pass per token (matmuls only; a multiply-add counts as 2 FLOPs).

        flops/token = 2 * P_nonembed                      # every weight matrix of the L decoder layers
                    + 2 * V * D                           # lm_head (tied: the embedding matrix reused)
                    + 4 * L * T * N * H                   # attention scores q.k (2*T*N*H) and p.v (2*T*N*H)

    with P_nonembed = L * (D * H * (2N + 2K) + 3 * D * F)  (q, k, v, o projections and gate/up/down), D the
    model width, F the MLP width, N/K query/kv heads, H the head dim (N*H = D for SmolLM2), V the vocab,
    L the layers and T the sequence length. The attention term counts the full T x T score matrix, as XLA's
    einsum attention and SDPA's math kernel compute it (a causal-aware kernel does about half); norms,
    RoPE, softmax and the embedding gather are left out (a few % at most). This is the PaLM-paper
    forward cost (its 6N + 12LHQT training formula counts forward + backward = 3x this).
    """
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    N, K, H, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    p_nonembed = L * (D * H * (2 * N + 2 * K) + 3 * D * F)
    head = V * D  # tied or not, the output projection is one [D, V] matmul
    return 2.0 * p_nonembed + 2.0 * head + 4.0 * L * seq_len * N * H


def peak_flops(device_kind: str, dtype: str) -> float | None:
    for key, by_dtype in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return by_dtype.get(dtype)
    return None


# ------------------------------------------------------------------------------------------------ setup


def parse_ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=parse_ints, default=[1, 4, 8], help="comma-separated (default 1,4,8)")
    p.add_argument("--lengths", type=parse_ints, default=[128, 512], help="comma-separated (default 128,512)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per cell and framework; the median "
                   "is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per cell and framework after compile "
                   "(default 1, at least 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (weights are stored in it too, for both frameworks; default float32)")
    p.add_argument("--torch-dtype", choices=("same", "float32", "bfloat16"), default="same",
                   help="torch dtype ('same': follow --dtype)")
    p.add_argument("--attention", choices=("xla", "fused"), default="xla",
                   help="jaxrl_llm attention_impl (default xla: einsum + softmax)")
    p.add_argument("--gguf", action="store_true", help="real SmolLM2 weights from the GGUF (skipped, with a "
                   "note, when jaxrl_llm.models.gguf_io is not available)")
    p.add_argument("--no-torch", action="store_true", help="time jaxrl_llm only")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s of the device for MFU (default: looked up by device kind on GPU)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write environment and results as JSON")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        p.error("--repeats and --warmup must be >= 1")
    if args.torch_dtype == "same":
        args.torch_dtype = args.dtype
    return args


def hf_config():
    import transformers

    cfg = transformers.LlamaConfig(**SMOLLM2_135M)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def gguf_path() -> str | None:
    """The SmolLM2 GGUF, or None (with the reason printed) when gguf_io or the file is not available."""
    try:
        gguf_io = importlib.import_module("jaxrl_llm.models.gguf_io")
    except ImportError as e:
        print(f"note: --gguf skipped: jaxrl_llm.models.gguf_io is not available ({e}); using random weights")
        return None
    fn = getattr(gguf_io, "smollm2_gguf_path", None)
    if fn is None:
        print("note: --gguf skipped: jaxrl_llm.models.gguf_io has no smollm2_gguf_path; using random weights")
        return None
    try:
        path = fn()
    except Exception as e:  # any failure to locate the file means "skip"
        print(f"note: --gguf skipped: smollm2_gguf_path() failed ({type(e).__name__}: {e}); using random weights")
        return None
    if not path or not os.path.exists(str(path)):
        print(f"note: --gguf skipped: no GGUF file at {path!r}; using random weights")
        return None
    return str(path)


def prepare_weights(args: argparse.Namespace, tmp: str) -> tuple[str, str]:
    """(HF folder both frameworks load, description of the weights)."""
    if args.gguf:
        path = gguf_path()
        if path is not None:
            cfg, params = models.load_pretrained(path, dtype=jnp.float32)
            folder = os.path.join(tmp, "hf")
            models.save_pretrained(cfg, params, folder)
            del params
            return folder, f"SmolLM2 GGUF {os.path.basename(path)} (dequantised, exported to an HF folder)"
    import torch
    import transformers

    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(hf_config()).to(torch.float32).eval()
    folder = os.path.join(tmp, "hf")
    model.save_pretrained(folder)
    del model
    return folder, f"random (HF init, seed {args.seed}), SmolLM2-135M config"


def load_jax(folder: str, args: argparse.Namespace) -> tuple[models.ModelConfig, dict]:
    cfg, params = models.load_pretrained(folder, dtype=args.dtype)
    cfg = dataclasses.replace(cfg, compute_dtype=args.dtype, attention_impl=args.attention)
    expect = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                  num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    wrong = {k: (getattr(cfg, k), v) for k, v in expect.items() if getattr(cfg, k) != v}
    if wrong:
        print(f"warning: the loaded config is not SmolLM2-135M: {wrong} (got, expected)")
    return cfg, params


def load_torch(folder: str, args: argparse.Namespace, device: str):
    import torch
    import transformers

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.torch_dtype]
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dt, attn_implementation="sdpa")
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- timing


def jax_runner(cfg, params, ids_np: np.ndarray) -> tuple[Any, float]:
    """(a no-argument forward that blocks until the logits are ready, compile seconds). One executable per shape."""
    ids = jnp.asarray(ids_np, jnp.int32)
    mask = jnp.ones(ids.shape, jnp.int32)  # full batch, no padding

    def fwd(params, ids, mask):
        return models.forward(cfg, params, ids, mask)

    t0 = time.perf_counter()
    compiled = jax.jit(fwd).lower(params, ids, mask).compile()
    compile_s = time.perf_counter() - t0
    return (lambda: jax.block_until_ready(compiled(params, ids, mask))), compile_s


def torch_runner(model, ids_np: np.ndarray, device: str):
    """A no-argument HF forward (inference mode, no KV cache, all-ones mask) that returns finished logits."""
    import torch

    ids_t = torch.tensor(ids_np, dtype=torch.long, device=device)
    mask_t = torch.ones_like(ids_t)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            out = model(input_ids=ids_t, attention_mask=mask_t, use_cache=False).logits
        sync()
        return out

    return run


def time_interleaved(runners: dict[str, Any], repeats: int, warmup: int) -> tuple[dict[str, list[float]], dict]:
    """Warm every runner up, then time them in turns (the order alternates each repeat), so a change in machine
    load during the cell hits all of them alike. Returns ({name: [seconds per repeat]}, {name: last output})."""
    outs = {}
    for name, fn in runners.items():
        for _ in range(warmup):
            outs[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            outs[name] = runners[name]()
            times[name].append(time.perf_counter() - t0)
    return times, outs


# --------------------------------------------------------------------------------------------- reports


def usable_cores() -> int:
    """Cores this process may run on (os.cpu_count(), narrowed by `taskset` / cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(args, torch_device: str | None, weights: str, cfg, params, load_before) -> dict:
    dev = jax.devices()[0]
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": importlib.import_module("jaxlib").__version__,
        "jax_backend": jax.default_backend(),
        "jax_device": f"{dev.device_kind} x{jax.device_count()}",
        "cpu": f"{cpu_name()} ({os.cpu_count()} logical cores, {usable_cores()} usable by this process)",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "loadavg_before": " ".join(f"{x:.2f}" for x in load_before),
        "weights": weights,
        "dtype": args.dtype,
        "attention_impl": cfg.attention_impl,
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
    }
    if torch_device is not None:
        import torch
        import transformers

        env.update({
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_device": torch.cuda.get_device_name() if torch_device == "cuda" else "cpu",
            "torch_dtype": args.torch_dtype,
            "torch_threads": torch.get_num_threads(),
            "torch_attention": "sdpa",
        })
    if jax.default_backend() == "cpu":
        env["xla_threads"] = f"{usable_cores()} (XLA:CPU's thread pool spans every usable core)"
    return env


def markdown_table(rows: list[dict], with_torch: bool, with_mfu: bool) -> str:
    head = ["batch", "length", "tokens", "jax tok/s", "jax ms"]
    if with_torch:
        head += ["torch tok/s", "torch ms", "jax/torch"]
    head += ["jax compile s"]
    if with_mfu:
        head += ["jax MFU"] + (["torch MFU"] if with_torch else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for r in rows:
        cells = [str(r["batch"]), str(r["length"]), str(r["tokens"]), f"{r['jax_tok_s']:,.0f}",
                 f"{1e3 * r['jax_s']:.1f}"]
        if with_torch:
            cells += [f"{r['torch_tok_s']:,.0f}", f"{1e3 * r['torch_s']:.1f}", f"{r['ratio']:.2f}x"]
        cells += [f"{r['jax_compile_s']:.1f}"]
        if with_mfu:
            cells += [_pct(r.get("jax_mfu"))] + ([_pct(r.get("torch_mfu"))] if with_torch else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()  # 1/5/15-min load of the machine before this benchmark adds its own
    on_gpu = jax.default_backend() == "gpu"
    torch_device = None
    if not args.no_torch:
        import torch

        torch_device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        if torch_device == "cpu":
            torch.set_num_threads(usable_cores())  # = os.cpu_count() unless pinned with taskset
        else:
            torch.backends.cuda.matmul.allow_tf32 = True  # match XLA's default fp32 matmul precision on GPU
            torch.backends.cudnn.allow_tf32 = True
        if on_gpu and torch_device == "cpu":
            print("note: torch has no CUDA here; torch runs on the CPU (ratios are not like for like)")

    peak = args.peak_flops
    if peak is None and on_gpu:
        peak = peak_flops(jax.devices()[0].device_kind, args.dtype)
        if peak is None:
            print(f"note: no peak FLOP/s known for {jax.devices()[0].device_kind!r}; pass --peak-flops for MFU")
    with_mfu = on_gpu or args.peak_flops is not None

    with tempfile.TemporaryDirectory(prefix="bench_forward_") as tmp:
        t0 = time.perf_counter()
        folder, weights = prepare_weights(args, tmp)
        cfg, params = load_jax(folder, args)
        model = load_torch(folder, args, torch_device) if torch_device else None
        setup_s = time.perf_counter() - t0

    env = environment(args, torch_device, weights, cfg, params, load_before)
    print("## forward-pass throughput: SmolLM2-135M, jaxrl_llm vs HF transformers\n")
    for k, v in env.items():
        print(f"- {k}: {v}")
    print(f"- repeats: {args.repeats} timed (median reported) after {args.warmup} warm-up; "
          f"weights ready in {setup_s:.1f} s\n", flush=True)

    rows = []
    for T in args.lengths:
        for B in args.batches:
            ids = np.random.default_rng(args.seed + 1000 * B + T).integers(0, cfg.vocab_size, size=(B, T))
            runners: dict[str, Any] = {}
            runners["jax"], compile_s = jax_runner(cfg, params, ids)
            if model is not None:
                runners["torch"] = torch_runner(model, ids, torch_device)
            times, outs = time_interleaved(runners, args.repeats, args.warmup)
            jax_s = statistics.median(times["jax"])
            r: dict[str, Any] = dict(batch=B, length=T, tokens=B * T, jax_s=jax_s, jax_tok_s=B * T / jax_s,
                                     jax_compile_s=compile_s, jax_times=times["jax"])
            if model is not None:
                torch_s = statistics.median(times["torch"])
                r.update(torch_s=torch_s, torch_tok_s=B * T / torch_s, torch_times=times["torch"])
                r["ratio"] = r["jax_tok_s"] / r["torch_tok_s"]
                if not rows:  # same weights, same tokens: the logits must agree (sanity check, first cell)
                    ref = outs["torch"].float().cpu().numpy()
                    r["max_abs_logit_diff"] = float(np.max(np.abs(np.asarray(outs["jax"], np.float32) - ref)))
            del runners, outs
            fpt = forward_flops_per_token(cfg, T)
            r["flops_per_token"] = fpt
            if with_mfu and peak:
                r["jax_mfu"] = fpt * r["jax_tok_s"] / peak
                if model is not None:
                    r["torch_mfu"] = fpt * r["torch_tok_s"] / peak
            rows.append(r)
            msg = f"  B={B:<3d} T={T:<5d} jax {r['jax_tok_s']:>9,.0f} tok/s (compile {r['jax_compile_s']:.1f} s)"
            if model is not None:
                msg += f"  torch {r['torch_tok_s']:>9,.0f} tok/s  ratio {r['ratio']:.2f}x"
            print(msg, file=sys.stderr, flush=True)

    env["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if jax.default_backend() == "cpu" and load_before[0] > 0.5:
        print(f"warning: the machine was busy before the run (1-min load {load_before[0]:.2f} on "
              f"{os.cpu_count()} cores): CPU timings are noisy, and torch's OpenMP threads suffer most")
    print(markdown_table(rows, model is not None, with_mfu and bool(peak)))
    if "max_abs_logit_diff" in rows[0]:
        print(f"\nsanity: max |logit_jax - logit_torch| on the first cell = {rows[0]['max_abs_logit_diff']:.2e}")
    if with_mfu and peak:
        print(f"MFU: forward_flops_per_token(cfg, T) x tok/s / {peak:.3g} FLOP/s peak")
    if args.json:
        out = {"benchmark": "forward", "env": env, "args": {k: v for k, v in vars(args).items()},
               "peak_flops": peak, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
