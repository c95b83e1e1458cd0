"""Bytes one decode step moves, read off the compiled (optimized) HLO of `sampling.loop.decode`, against the minimum
(the layer weights and the vocabulary head read once, the KV cache read once). Compile only: nothing runs and no
weights are allocated, so any model shape works on any backend.

    python benchmarks/decode_bytes.py                                   # tiny + SmolLM2 shapes, batch 1, 8, 64
    python benchmarks/decode_bytes.py --models llama1b --batch-sizes 64 --param-dtype bfloat16,float32 --top 12

XLA's cost_analysis counts a while loop's body once, whatever its trip count; this sums the loop body's top-level
instructions itself (a fusion reads its operands, or only the slice a dynamic-slice inside it takes, and writes
its output, or only the update of an in-place dynamic-update-slice root; nested loops times their known trip
count; of a conditional's branches the cheapest, i.e. greedy decoding, and the dearest, sampling with top-k/top-p).
The loop is compiled as `generate` runs it on this backend. A bf16 compile on XLA:CPU says little about a GPU:
XLA:CPU computes bf16 products and slices in fp32 (it copies the layer slices it converts). `--top N` lists a
step's N dearest instructions: on a GPU, a fusion that writes a whole layer's weights or cache is a slice that the
products did not read in place.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from functools import partial

_DT = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
       "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DT) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id"}


def _bytes(shape: str) -> int:
    return sum(_DT[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _ARRAY.findall(shape))


class HloBytes:
    """Per-step byte accounting over an HLO module's text (`compiled.as_text()`)."""

    def __init__(self, text: str):
        self.comps: dict[str, list[dict]] = {}
        cur = None
        for line in text.splitlines():
            m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
            if m and not line.startswith(" "):
                cur = m.group(2)
                self.comps[cur] = []
                self.entry = cur if m.group(1) else getattr(self, "entry", None)
            elif line.startswith("}"):
                cur = None
            elif cur is not None and (mi := _INSTR.match(line)):
                root, name, shape, op, rest = mi.groups()
                self.comps[cur].append(dict(root=bool(root), name=name, shape=shape, op=op, rest=rest, line=line))
        self.named = {c: {i["name"]: i for i in ins} for c, ins in self.comps.items()}

    @staticmethod
    def operands(ins: dict) -> list[str]:
        depth, buf = 1, ""
        for ch in ins["rest"]:
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
            buf += ch
        return re.findall(r"%([\w.\-]+)", buf)

    @staticmethod
    def attr(ins: dict, key: str) -> str | None:
        m = re.search(key + r"=%?([\w.\-]+)", ins["rest"])
        return m.group(1) if m else None

    def _sliced(self, name: str, users: dict, scale: float = 1.0) -> int | None:
        """Bytes of `name` a fusion reads when it only slices it (maybe through converts and bitcasts, which a
        fusion computes per element it uses), else None."""
        us = users.get(name, [])
        if not us:
            return None
        total = 0
        for u in us:
            if u["op"] in ("dynamic-slice", "slice") and self.operands(u)[0] == name:
                total += int(_bytes(u["shape"]) * scale)
            elif u["op"] in ("convert", "bitcast", "reshape", "copy"):
                sub = self._sliced(u["name"], users, scale * 1.0)
                if sub is None:
                    return None
                total += sub
            else:
                return None
        return total

    def _fusion(self, ins: dict) -> int:
        comp = self.attr(ins, "calls")
        body, named = self.comps[comp], self.named[comp]
        params = {int(re.match(r"(\d+)", i["rest"]).group(1)): i for i in body if i["op"] == "parameter"}
        users: dict[str, list[dict]] = {}
        for i in body:
            for o in self.operands(i):
                users.setdefault(o, []).append(i)
        root = next(i for i in body if i["root"])
        outs = [named[o] for o in self.operands(root)] if root["op"] == "tuple" else [root]
        in_place = set()
        for d in (o for o in outs if o["op"] == "dynamic-update-slice"):
            base = named[self.operands(d)[0]]
            while base["op"] in ("bitcast", "copy"):
                base = named[self.operands(base)[0]]
            if base["op"] == "parameter":
                in_place.add(base["name"])
        total = 0
        for k, _ in enumerate(self.operands(ins)):
            p = params[k]
            if p["name"] in in_place:
                continue
            sliced = self._sliced(p["name"], users)
            total += _bytes(p["shape"]) if sliced is None else sliced
        for o in outs:
            total += _bytes(named[self.operands(o)[1]]["shape"]) if o["op"] == "dynamic-update-slice" \
                else _bytes(o["shape"])
        return total

    def computation(self, comp: str, branch: str = "min", mult: int = 1, detail: list | None = None) -> int:
        total = 0
        for ins in self.comps[comp]:
            op = ins["op"]
            if op in _FREE:
                continue
            if op == "while":
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins["line"])
                n = int(m.group(1)) if m else 1
                total += n * sum(self.computation(self.attr(ins, k), branch, mult * n, detail)
                                 for k in ("body", "condition"))
                continue
            if op == "conditional":
                m = re.search(r"branch_computations=\{([^}]*)\}", ins["line"])
                branches = re.findall(r"%([\w.\-]+)", m.group(1)) if m else \
                    [self.attr(ins, "true_computation"), self.attr(ins, "false_computation")]
                costs = [self.computation(b, branch, mult) for b in branches]
                pick = costs.index(min(costs) if branch == "min" else max(costs))
                total += self.computation(branches[pick], branch, mult, detail)
                continue
            if op == "call":
                total += self.computation(self.attr(ins, "to_apply"), branch, mult, detail)
                continue
            named = self.named[comp]
            if op == "fusion":
                b = self._fusion(ins)
            elif op == "dynamic-update-slice":
                b = 2 * _bytes(named[self.operands(ins)[1]]["shape"])
            elif op in ("dynamic-slice", "slice"):
                b = 2 * _bytes(ins["shape"])
            else:
                b = _bytes(ins["shape"]) + sum(_bytes(named[o]["shape"]) for o in self.operands(ins) if o in named)
            total += b
            if detail is not None:
                detail.append((b * mult, op, ins["name"], ins["shape"].split("{")[0][:60]))
        return total

    def decode_step(self, branch: str = "min", detail: list | None = None) -> int:
        """Bytes of one iteration of the entry computation's largest while loop (the decode loop)."""
        loop = max((i for i in self.comps[self.entry] if i["op"] == "while"), key=lambda i: _bytes(i["shape"]))
        return sum(self.computation(self.attr(loop, k), branch, 1, detail) for k in ("body", "condition"))


def _inputs(B: int, V: int):
    import jax
    import jax.numpy as jnp

    from jaxrl_llm.sampling import loop
    from jaxrl_llm.sampling.strategies import RowSampler

    sd, f32, i32 = jax.ShapeDtypeStruct, jnp.float32, jnp.int32
    return sd((B, V), f32), loop.DecodeInputs(
        start_B=sd((B,), i32), sampler=RowSampler(temperature_B=sd((B,), f32), top_k_B=sd((B,), i32),
                                                  top_p_B=sd((B,), f32)),
        raw_logprobs_B=sd((B,), bool), stop_ids_BK=sd((B, 8), i32), max_new_B=sd((B,), i32),
        row_ids_B=sd((B,), i32), rng=jax.eval_shape(lambda: jax.random.key(0)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--param-dtype", default="bfloat16", help="comma list of float32, bfloat16")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--unroll-layers", choices=("auto", "on", "off"), default="auto",
                    help="the per-layer decode loop (auto: generate's default on this backend)")
    ap.add_argument("--top", type=int, default=0, help="list a step's N dearest instructions (greedy)")
    args = ap.parse_args(argv)

    import dataclasses

    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sampler import SHAPES  # the sampler benchmark's model shapes

    from jaxrl_llm import models
    from jaxrl_llm.models.decode_layout import decode_params
    from jaxrl_llm.sampling import loop
    from jaxrl_llm.sampling.cache import cache_bytes
    from jaxrl_llm.sampling.request import bucket_length, bucket_new_tokens

    on_cpu = jax.default_backend() == "cpu"
    S = bucket_length(args.prompt_len) + bucket_new_tokens(args.new_tokens)
    N = bucket_new_tokens(args.new_tokens)
    print(f"{jax.default_backend()} ({jax.devices()[0].device_kind}); {S} cache slots; compute {args.compute_dtype}; "
          "MB a decode step")
    print("| model | params | form | batch | weights | cache | minimum | greedy step | x min | sampled (top-k/p) | "
          "x min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, pdt in ((m, d) for m in args.models.split(",") for d in args.param_dtype.split(",")):
        cfg = models.config_from_hf({**SHAPES[name], "model_type": "llama", "torch_dtype": "float32"})
        cfg = dataclasses.replace(cfg, compute_dtype=args.compute_dtype)
        params = jax.tree.map(lambda a, d=pdt: jax.ShapeDtypeStruct(a.shape, d), models.abstract_params(cfg))
        unroll = {"on": True, "off": False, "auto": on_cpu and args.compute_dtype == "float32"}[args.unroll_layers]
        dparams = jax.eval_shape(partial(decode_params, cfg), params) if unroll else params
        nbytes = lambda t: sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(t))
        head = dparams["lm_head_t"] if unroll else dparams["embed" if cfg.tie_word_embeddings else "lm_head"]
        weights = nbytes(dparams["layers"]) + nbytes(head)
        for B in (int(b) for b in args.batch_sizes.split(",")):
            cache = {n: jax.ShapeDtypeStruct((cfg.num_layers, B, cfg.num_kv_heads, S, cfg.head_dim), cfg.dtype)
                     for n in "kv"}
            logits, inp = _inputs(B, cfg.vocab_size)
            compiled = loop.decode.lower(cfg, dparams, cache, logits, inp, max_new_bucket=N,
                                         cast_weights=not on_cpu and not unroll, cache_bits=on_cpu).compile()
            hlo = HloBytes(compiled.as_text())
            detail: list = []
            greedy, sampled = hlo.decode_step("min", detail), hlo.decode_step("max")
            least = weights + cache_bytes(cfg, B, S)
            mb = lambda x: f"{x / 1e6:.1f}"
            print(f"| {name} | {pdt} | {'per-layer' if unroll else 'layer scan'} | {B} | {mb(weights)} | "
                  f"{mb(cache_bytes(cfg, B, S))} | {mb(least)} | {mb(greedy)} | {greedy / least:.2f} | {mb(sampled)} | "
                  f"{sampled / least:.2f} |", flush=True)
            for b, op, ins, shape in sorted(detail, key=lambda t: -t[0])[:args.top]:
                print(f"    {b / 1e6:9.2f} MB  {op:14s} {ins[:48]:48s} {shape}", flush=True)


if __name__ == "__main__":
    main()
