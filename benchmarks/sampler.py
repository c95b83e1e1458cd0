"""Generated tokens/s of `sampling.generate` vs HF transformers `generate` (PyTorch), same machine, one run.

    python benchmarks/sampler.py                        # tiny + SmolLM2-135M-sized, batch 1, 8, 32
    python benchmarks/sampler.py --threads 1 --models smollm2 --batch-sizes 8 --new-tokens 32

Both sides: the same weights (random, from the model's config, saved once to a temp dir; or the SmolLM2 GGUF with
--gguf), in --dtype (fp32 by default; the KV cache and activations too), greedy, the same prompts, exactly
`--new-tokens` new tokens per row (no stop ids; HF: min_new_tokens = max_new_tokens), the same number of CPU threads
(--threads 1: torch.set_num_threads(1) and XLA's single-threaded CPU dots; default: every core for both). Timings
exclude compilation (one warm-up call per shape; the first call's time is reported beside) and are the best of
--repeats rounds, each round running JAX and HF back to back (on a shared machine the load drifts; interleaving
keeps the comparison fair).
On a GPU backend HF runs on CUDA (when torch sees a GPU) and the JAX rows add the decode step time against the
HBM roofline: (bytes of parameters + KV cache read per step) / measured device-to-device copy bandwidth, and
their ratio ("of roofline": 100% = every decode step only streams its bytes at the copy rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
# SmolLM2-135M(-Instruct) config.json
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=True)
# Llama-3.2-1B config.json (random weights; a GPU-sized model: see benchmarks/forward.py LLAMA_1B)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
SHAPES = {"tiny": TINY, "smollm2": SMOLLM2, "llama1b": LLAMA_1B}


def build_model(name: str, folder: str, gguf: bool, dtype: str = "float32", device: str = "cpu"):
    """(HF torch model on `device`, jax cfg, jax params) with the same weights, both in `dtype`."""
    import torch
    import transformers

    from jaxrl_llm import models

    tdtype = getattr(torch, dtype)
    if gguf:
        from jaxrl_llm.models.gguf_io import smollm2_gguf_path

        cfg, params = models.load_pretrained(smollm2_gguf_path())
        models.save_pretrained(cfg, params, folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=tdtype)
    else:
        torch.manual_seed(0)
        hcfg = transformers.LlamaConfig(**SHAPES[name], bos_token_id=1, eos_token_id=2)
        hf = transformers.LlamaForCausalLM(hcfg).to(torch.float32)
        hf.save_pretrained(folder)
        hf = hf.to(tdtype)
    cfg, params = models.load_pretrained(folder, dtype=dtype)
    return hf.to(device).eval(), dataclasses.replace(cfg, compute_dtype=dtype), params


def jax_runner(cfg, params, prompts, new_tokens: int, unroll_layers: bool | None = None):
    """A zero-argument callable running one timed-able generate call, and the first (compiling) call's seconds."""
    from jaxrl_llm import sampling

    sp = sampling.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    t0 = time.perf_counter()
    out = sampling.generate(cfg, params, prompts, sp, 0, unroll_layers=unroll_layers)
    first_s = time.perf_counter() - t0
    assert all(len(t) == new_tokens for t in out.tokens)

    def run() -> dict:
        out = sampling.generate(cfg, params, prompts, sp, 0, unroll_layers=unroll_layers)
        assert out.stats["compiles"] == 0
        return out.stats

    return run, first_s


def hf_runner(hf, prompts, new_tokens: int):
    import torch

    ids = torch.tensor(prompts, dtype=torch.long, device=hf.device)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=0)
    hf.generation_config.eos_token_id = None

    def run(n: int = new_tokens) -> None:
        with torch.inference_mode():
            out = hf.generate(ids, **{**kw, "max_new_tokens": n, "min_new_tokens": n})
        sync()
        assert out.shape[1] == ids.shape[1] + n

    run(2)  # warm-up
    return run


def interleaved_best(runs: dict, repeats: int) -> dict:
    """Best wall time of each callable over `repeats` rounds, alternating them (a shared, busy machine drifts)."""
    best = {k: (float("inf"), None) for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            res = f()
            dt = time.perf_counter() - t0
            if dt < best[k][0]:
                best[k] = (dt, res)
    return best


def copy_bandwidth() -> float:
    """Device-to-device bytes/s (read + write) of a 1 GiB copy."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256 * 1024 * 1024,), jnp.float32)
    f = jax.jit(lambda a: a + 0)
    jax.block_until_ready(f(x))
    t0 = time.perf_counter()
    for _ in range(5):
        y = f(x)
    jax.block_until_ready(y)
    return 2 * x.nbytes * 5 / (time.perf_counter() - t0)


def roofline(cfg, params, B: int, prompt_len: int, new_tokens: int, decode_s: float, bw: float) -> dict:
    import jax

    from jaxrl_llm.sampling.cache import cache_bytes
    from jaxrl_llm.sampling.request import bucket_length, bucket_new_tokens

    S = bucket_length(prompt_len) + bucket_new_tokens(new_tokens)
    step_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) + cache_bytes(cfg, B, S)
    step_ms, roofline_ms = 1e3 * decode_s / max(new_tokens - 1, 1), 1e3 * step_bytes / bw
    return dict(step_ms=step_ms, roofline_ms=roofline_ms, of_roofline=roofline_ms / step_ms,
                step_bytes=step_bytes, copy_gb_s=bw / 1e9)


def print_table(rows: list[dict], header: str, on_gpu: bool) -> None:
    print(f"\n{header}\n")
    head = "| model | batch | jax tok/s | HF tok/s | jax/HF | jax 1st call s | jax prefill s | jax decode s |"
    if on_gpu:
        head += " decode step ms | HBM roofline ms | of roofline |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        hf_tps = f"{r['hf_tps']:.1f}" if r["hf_tps"] else "-"
        ratio = f"{r['jax_tps'] / r['hf_tps']:.2f}x" if r["hf_tps"] else "-"
        line = (f"| {r['model']} | {r['batch']} | {r['jax_tps']:.1f} | {hf_tps} | {ratio} | {r['first_s']:.1f} | "
                f"{r['prefill_s']:.3f} | {r['decode_s']:.3f} |")
        if on_gpu:
            line += f" {r['step_ms']:.3f} | {r['roofline_ms']:.3f} | {r['of_roofline']:.0%} |"
        print(line)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,smollm2", help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both (1 or all cores)")
    ap.add_argument("--gguf", action="store_true", help="SmolLM2: the real GGUF weights instead of random ones")
    ap.add_argument("--no-hf", action="store_true", help="JAX only")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights, cache and compute of both sides (bfloat16: what a GPU user runs)")
    ap.add_argument("--json", default="", help="also write the environment and every row to this file")
    ap.add_argument("--unroll-layers", choices=("auto", "on", "off"), default="auto",
                    help="generate(unroll_layers=...): auto = per-layer decode on CPU, layer scan elsewhere")
    args = ap.parse_args(argv)
    if unknown := [m for m in args.models.split(",") if m not in SHAPES]:
        ap.error(f"--models: unknown {unknown}; expected some of {sorted(SHAPES)}")
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    elif args.threads != os.cpu_count():
        sys.exit("--threads: 1 or the number of cores (XLA's CPU thread pool cannot be sized otherwise)")

    if not args.no_hf:  # on a GPU torch needs memory beside JAX's (which takes 75% of it up front by default)
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import torch

    torch.set_num_threads(args.threads)
    on_gpu = jax.default_backend() == "gpu"
    bw = copy_bandwidth() if on_gpu else None
    device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    hf_too = not args.no_hf and (device == "cuda" or not on_gpu)  # never a GPU against a CPU
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as d:
            hf, cfg, params = build_model(name, d, args.gguf and name == "smollm2", args.dtype, device)
        rng = np.random.default_rng(0)
        for B in (int(b) for b in args.batch_sizes.split(",")):
            prompts = rng.integers(3, cfg.vocab_size, size=(B, args.prompt_len)).tolist()
            unroll = {"auto": None, "on": True, "off": False}[args.unroll_layers]
            jax_run, first_s = jax_runner(cfg, params, prompts, args.new_tokens, unroll)
            runs = {"jax": jax_run}
            if hf_too:
                runs["hf"] = hf_runner(hf, prompts, args.new_tokens)
            best = interleaved_best(runs, args.repeats)
            (jax_s, stats), hf_s = best["jax"], best["hf"][0] if "hf" in best else None
            n = B * args.new_tokens
            row = dict(model=name, batch=B, jax_tps=n / jax_s, hf_tps=(n / hf_s) if hf_s else None, first_s=first_s,
                       prefill_s=stats["prefill_seconds"], decode_s=stats["decode_seconds"])
            if on_gpu:
                row.update(roofline(cfg, params, B, args.prompt_len, args.new_tokens, stats["decode_seconds"], bw))
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    title = (f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {args.threads} thread(s), prompt "
             f"{args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, {args.dtype}, best of {args.repeats}"
             + (f"; HF on {device}" if hf_too else ""))
    print_table(rows, title, on_gpu)
    if bw:
        print(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s (1 GiB device-to-device, read + write)")
    if args.json:
        import importlib.metadata as md

        env = {n: md.version(n) for n in ("jax", "jaxlib", "torch", "transformers")}
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "title": title, "environment": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
