"""Mesh construction and the logical-axis rules table."""

from jaxrl_llm.parallel.mesh import MESH_AXES, MeshError, make_mesh, resolve_mesh_shape, single_device_mesh
from jaxrl_llm.parallel.rules import (
    DEFAULT_RULES,
    SAMPLING_LAYOUTS,
    ShardingRules,
    as_rules,
    batch_split_warning,
    constrain,
    sampling_rules,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshError",
    "SAMPLING_LAYOUTS",
    "ShardingRules",
    "as_rules",
    "batch_split_warning",
    "constrain",
    "make_mesh",
    "resolve_mesh_shape",
    "sampling_rules",
    "single_device_mesh",
]
