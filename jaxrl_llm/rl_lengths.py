"""Dynamic batching for GRPO's log-prob and loss passes: each chunk of rows cut to the columns its rows use.

A GRPO batch row is [pad..., prompt | completion, pad...] of data.max_prompt_len + the token budget columns
(`grpo.build_batch`), so every row is as wide as the longest prompt and the longest completion allowed. Completions
of a step are usually much shorter than the budget and spread widely; run at full width, the transformer, the
vocabulary projection and their backward spend that share of the step on padding. Here rows are sorted by
completion length (whole groups when the passes share each group's prompt), split into the same number of equal
chunks as before (log-prob chunks of the whole batch, or a minibatch's microbatches), and each chunk keeps only the
columns [max_prompt_len - prompt_width, max_prompt_len + completion_width): its longest prompt and its longest
completion, each rounded up on the `data.buckets` ladder so that a run compiles for a few widths only. The cut
columns are padding in every row of the chunk, and positions count from each row's first real token, so each row's
log-probs are the full-width ones (to float rounding: reductions run over other lengths). Losses and metrics are
sums over tokens divided by the minibatch's global count, so which rows share a microbatch does not change the
update either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxrl_llm import distributed, multiturn
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.data.buckets import bucket_width


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows of a batch (indices, in the chunk's order) and the columns they keep around the completion start P:
    [P - prompt_width, P + completion_width)."""

    rows: np.ndarray
    prompt_width: int
    completion_width: int

    def columns(self, prompt_len: int) -> slice:
        return slice(prompt_len - self.prompt_width, prompt_len + self.completion_width)

    def take(self, array: np.ndarray, prompt_len: int) -> np.ndarray:
        """The chunk's part of a batch array: [rows, kept columns] of an [R, T] array, [rows] of an [R] one."""
        a = array[self.rows]
        return a[:, self.columns(prompt_len)] if a.ndim == 2 else a


def row_lengths(attention_mask_RT: np.ndarray, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens [R], completion columns [R]) of `grpo.build_batch` rows: the attended columns before
    `prompt_len`, and the columns from `prompt_len` through each row's last attended one (0 for none)."""
    attn = np.asarray(attention_mask_RT) > 0
    prompt = attn[:, :prompt_len].sum(1)
    tail = attn[:, prompt_len:]
    completion = np.where(tail.any(1), tail.shape[1] - np.argmax(tail[:, ::-1], axis=1), 0)
    return prompt.astype(np.int64), completion.astype(np.int64)


def plan_chunks(rows: np.ndarray, prompt_R: np.ndarray, completion_R: np.ndarray, num_chunks: int, group: int,
                prompt_len: int, budget: int, rungs: int) -> list[Chunk]:
    """`rows` (batch indices) in `num_chunks` chunks of equal size, by longest completion (ties in the given
    order), each with the ladder widths (`bucket_width`, `rungs` per doubling) that hold its rows' prompts (capped
    at prompt_len) and completions (capped at budget). group > 1: consecutive runs of `group` rows stay together
    and in order, ranked by their longest completion (a chunk must hold whole groups of a shared prompt; `rows`
    and each chunk hold whole groups). The chunks come widest (prompt + completion columns) first."""
    rows = np.asarray(rows)
    n = len(rows)
    if num_chunks < 1 or n % num_chunks or (n // num_chunks) % group:
        raise ValueError(f"{n} rows do not split into {num_chunks} chunks of whole groups of {group}")
    key = completion_R[rows].reshape(-1, group).max(1)
    order = (np.argsort(-key, kind="stable")[:, None] * group + np.arange(group)).reshape(-1)
    ranked = rows[order]
    size = n // num_chunks
    out = []
    for c in range(num_chunks):
        r = ranked[c * size:(c + 1) * size]
        out.append(Chunk(r, bucket_width(int(prompt_R[r].max()), prompt_len, rungs),
                         bucket_width(int(completion_R[r].max()), budget, rungs)))
    out.sort(key=lambda c: -(c.prompt_width + c.completion_width))  # the widest first (a memory limit shows at once)
    return out


def padding_share(chunks: list[Chunk], prompt_R: np.ndarray, completion_R: np.ndarray, total_columns: int
                  ) -> tuple[float, float]:
    """(share of the full-width cells that the chunks keep, share of the kept cells that are padding): the work
    dynamic batching leaves, and how much of that is still padding."""
    kept = sum(len(c.rows) * (c.prompt_width + c.completion_width) for c in chunks)
    rows = sum(len(c.rows) for c in chunks)
    used = sum(int(prompt_R[c.rows].sum() + completion_R[c.rows].sum()) for c in chunks)
    return kept / max(rows * total_columns, 1), 1.0 - used / max(kept, 1)


class ChunkedPasses:
    """GRPO's log-prob passes and optimizer updates under dynamic batching (`grpo.length_buckets` > 0): the host
    places each chunk at its own width and calls functions jitted per prompt width (each compiles once per chunk
    shape it meets). The update sums each microbatch's gradients into one fp32 buffer (donated) and applies the
    minibatch mean once, as `grpo.make_train_step` does in one program."""

    def __init__(self, cfg: Any, optimizer: Any, config: Any, mesh: Any, rules: Any, param_shardings: Any,
                 opt_shardings: Any, group: int):
        self.cfg, self.config, self.mesh, self.rules, self.group = cfg, config, mesh, rules, group
        self.P = config.data.max_prompt_len
        self.budget = multiturn.total_token_budget(config.rollout)
        self.rungs = config.grpo.length_buckets
        self.p_sh = param_shardings
        self._grads, add, apply = grpo.make_microbatch_fns(cfg, optimizer, config, rules)
        sums_sh = (param_shardings, None, None, None)
        self.optimizer = optimizer
        self.state_sh = {"params": param_shardings, "opt_state": opt_shardings, "step": None}
        with jax.set_mesh(mesh):
            self._add = jax.jit(add, donate_argnums=0, out_shardings=sums_sh)
            # Only the state is donated: the new state aliases it; no output has the fp32 gradient sums' shapes,
            # so donating them too saves nothing and, on one device, warns "donated buffers were not usable".
            self._apply = jax.jit(apply, donate_argnums=0, out_shardings=(self.state_sh, None))
        self._fns: dict[tuple[str, int], Callable] = {}
        self.shapes: set[tuple[str, int, int]] = set()  # (pass, prompt width, completion width) met: a compile each

    def plan(self, rows: np.ndarray, lengths: tuple[np.ndarray, np.ndarray], num_chunks: int) -> list[Chunk]:
        return plan_chunks(rows, *lengths, num_chunks, self.group, self.P, self.budget, self.rungs)

    def _place(self, x: np.ndarray, axes: tuple[str, ...]) -> jax.Array:
        return distributed.put_global(x, self.rules.sharding(self.mesh, axes, x.shape))

    def _fn(self, kind: str, chunk: Chunk) -> Callable:
        width = chunk.prompt_width
        self.shapes.add((kind, width, chunk.completion_width))
        if (kind, width) not in self._fns:
            ro = self.config.rollout
            with jax.set_mesh(self.mesh):
                if kind == "grads":
                    fn = jax.jit(self._grads(width), out_shardings=(self.p_sh, None, None, None))
                elif kind == "step":  # every microbatch of the width: grpo's one-program update
                    fn = jax.jit(grpo.make_train_step(self.cfg, self.optimizer, self.config, self.rules, width),
                                 donate_argnums=0, out_shardings=(self.state_sh, None))
                else:  # the reference model keeps the temperature only; the policy also the sampler's filter
                    k, p = (ro.top_k, ro.top_p) if kind == "policy" else (0, 1.0)
                    fn = jax.jit(grpo.make_logprobs_fn(self.cfg, ro.temperature, 1, self.rules, k, p,
                                                       first_target=width, group=self.group))
            self._fns[kind, width] = fn
        return self._fns[kind, width]

    def logprobs(self, kind: str, chunks: list[Chunk], params: Any, ids_RT: np.ndarray, attn_RT: np.ndarray
                 ) -> np.ndarray:
        """Log-probs [R, T] ("policy": under the sampler's filter; "reference": temperature only) of the batch
        rows, chunk by chunk; the columns a chunk cut are 0 (padding, outside every loss mask)."""
        outs = []
        for ch in chunks:  # all dispatched before the first is fetched
            ids, attn = (self._place(ch.take(x, self.P), ("batch", "length")) for x in (ids_RT, attn_RT))
            outs.append(self._fn(kind, ch)(params, ids, attn))
        out = np.zeros(np.shape(ids_RT), np.float32)
        for ch, o in zip(chunks, outs, strict=True):
            out[ch.rows, ch.columns(self.P)] = distributed.to_host(o)
        return out

    def update(self, state: dict, batch: dict[str, np.ndarray], chunks: list[Chunk], on_policy: Any
               ) -> tuple[dict, dict[str, Any]]:
        """One optimizer update on the minibatch that `chunks` (its microbatches) hold. When they all have the same
        widths, one program runs them (`grpo.make_train_step`, microbatches in a scan) on the rows in chunk order."""
        rows = np.concatenate([c.rows for c in chunks])
        if len({(c.prompt_width, c.completion_width) for c in chunks}) == 1:
            whole = Chunk(rows, chunks[0].prompt_width, chunks[0].completion_width)
            mb = {k: self._place(whole.take(batch[k], self.P), grpo.BATCH_AXES[k]) for k in grpo.BATCH_AXES}
            return self._fn("step", whole)(state, mb, on_policy)
        scale = float(grpo.nll_scale(batch["loss_mask"][rows], batch["positive"][rows],
                                     self.config.grpo.token_level))
        acc = None
        for ch in chunks:
            mb = {k: self._place(ch.take(batch[k], self.P), grpo.BATCH_AXES[k]) for k in grpo.BATCH_AXES}
            sums = self._fn("grads", ch)(state["params"], mb, on_policy, np.float32(scale))
            acc = sums if acc is None else self._add(acc, sums)
        return self._apply(state, acc)
