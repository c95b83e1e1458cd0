"""The one table where logical axis names meet mesh axes, and the helpers that apply it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

# Logical axes used by parameters, activations and the KV cache.
#   batch     rows of a batch                 layers    stacked transformer layers (scan axis)
#   length    sequence positions              embed     model width (d_model)
#   heads     query heads                     kv_heads  key/value heads
#   head_dim  per-head width                  mlp       MLP hidden width
#   vocab     vocabulary                      labels    outputs of a score head
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("labels", None),
)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axes. Hashable, so it can be a static argument of a jitted function."""

    rules: tuple[tuple[str, MeshAxes], ...] = DEFAULT_RULES

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        for name, axes in self.rules:
            if name == logical:
                if axes is None:
                    return ()
                return (axes,) if isinstance(axes, str) else tuple(axes)
        raise KeyError(f"logical axis {logical!r} has no rule; known: {[n for n, _ in self.rules]}")

    def spec(
        self,
        logical_axes: Sequence[str | None],
        shape: Sequence[int] | None = None,
        mesh_shape: dict[str, int] | None = None,
    ) -> PartitionSpec:
        """PartitionSpec for an array with these logical axes.

        A mesh axis is used at most once per array (the first logical axis that asks for it wins), and,
        when `shape` and `mesh_shape` are given, mesh axes that do not divide a dimension are dropped for
        that dimension (it is replicated along them instead), so every model shape can be placed on
        every mesh.
        """
        used: set[str] = set()
        out: list[MeshAxes] = []
        for i, logical in enumerate(logical_axes):
            chosen: list[str] = []
            size = 1
            for ax in self.mesh_axes(logical):
                if ax in used:
                    continue
                if mesh_shape is not None:
                    if ax not in mesh_shape:
                        continue
                    n = mesh_shape[ax]
                    if shape is not None and shape[i] % (size * n):
                        continue
                    size *= n
                chosen.append(ax)
            used.update(chosen)
            out.append(None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen)))
        while out and out[-1] is None:
            out.pop()
        return PartitionSpec(*out)

    def sharding(self, mesh: jax.sharding.Mesh, logical_axes: Sequence[str | None],
                 shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical_axes, shape, dict(mesh.shape)))


def as_rules(rules: ShardingRules | None, key: str = "rules") -> ShardingRules:
    """`rules`, or the default table for None; a TypeError naming the fix for anything else (a bare table such as
    DEFAULT_RULES, which failed deep inside with "'tuple' object has no attribute 'spec'")."""
    if rules is None:
        return ShardingRules()
    if not isinstance(rules, ShardingRules):
        raise TypeError(f"{key}: expected a parallel.ShardingRules (or None: the default table), got "
                        f"{type(rules).__name__}; wrap a table of (logical axis, mesh axes) pairs as "
                        "parallel.ShardingRules(table), e.g. parallel.ShardingRules(parallel.DEFAULT_RULES)")
    return rules


def sampling_rules(layout: str) -> ShardingRules | None:
    """The rules table the sampler uses for a named layout (a config's rollout.sampling_layout), None for the
    trainer's own. "tensor": weights sharded over the tensor axis only (heads, MLP width, vocabulary) and whole on
    every fsdp device, so that a decode step gathers no weights; the batch still splits over data and fsdp. The
    parameters are resharded once per generate call, which sampling.generate times (stats['reshard_seconds']), or
    once for several calls with sampling.prepare_params (GRPO: once per step)."""
    if layout == "":
        return None
    if layout == "tensor":
        return ShardingRules(tuple((name, None if name == "embed" else axes) for name, axes in DEFAULT_RULES))
    raise ValueError(f"sampling layout {layout!r}; expected one of {SAMPLING_LAYOUTS}")


SAMPLING_LAYOUTS = ("", "tensor")


def batch_split_warning(rules: ShardingRules, mesh: jax.sharding.Mesh, rows: dict[str, int]) -> str | None:
    """A warning when a batch does not split over the mesh axes its `batch` rule names, else None.

    `rules.spec` drops every such axis whose size does not divide the rows, so the rows are replicated along
    it: each of those devices computes the same rows and data parallelism is lost there, silently.
    `rows` maps a name a user knows (a config key, "a microbatch") to its number of rows; the one that loses the
    most devices is said (a microbatch of a batch that splits may still not split).
    """
    shape = dict(mesh.shape)
    wanted = [ax for ax in rules.mesh_axes("batch") if shape.get(ax, 1) > 1]
    worst: tuple[int, str, int, list[str]] | None = None
    for name, n in rows.items():
        spec = rules.spec(("batch",), (n,), shape)
        got = spec[0] if len(spec) else None
        got = (got,) if isinstance(got, str) else tuple(got or ())
        lost = [ax for ax in wanted if ax not in got]
        if lost and (worst is None or math.prod(shape[ax] for ax in lost) > worst[0]):
            worst = (math.prod(shape[ax] for ax in lost), name, n, lost)
    if worst is None:
        return None
    _, name, n, lost = worst
    return (f"{name}={n} rows do not split over the mesh's batch axes "
            f"{', '.join(f'{ax}={shape[ax]}' for ax in wanted)}: the rows are replicated along "
            f"{', '.join(lost)} (those devices all compute the same rows); use a multiple of "
            f"{math.prod(shape[ax] for ax in wanted)}")


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: ShardingRules | None) -> jax.Array:
    """with_sharding_constraint by logical names under the current mesh (`jax.set_mesh`); no-op without one."""
    if rules is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return x
    spec = rules.spec(logical_axes, x.shape, dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
