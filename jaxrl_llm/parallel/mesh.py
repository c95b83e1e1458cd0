"""Device mesh from config: axes (data, fsdp, tensor); -1 on one axis takes the remaining devices."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    """The requested mesh shape does not fit the devices."""


def resolve_mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1, num_devices: int | None = None
                       ) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the one -1 resolved; errors name the axis and the device count."""
    n = jax.device_count() if num_devices is None else num_devices
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise MeshError(f"mesh.{k}={v!r}: each mesh axis must be a positive integer or -1")
    if len(free) > 1:
        raise MeshError(f"mesh: only one axis may be -1, got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % fixed:
            raise MeshError(
                f"mesh: {n} devices are not divisible by the fixed axes "
                f"({', '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)}, product {fixed})"
            )
        sizes[free[0]] = n // fixed
    elif fixed != n:
        raise MeshError(
            f"mesh: data*fsdp*tensor = {data}*{fsdp}*{tensor} = {fixed}, but there are {n} devices; "
            "set one axis to -1 to take the remaining devices"
            + ("" if fixed > n else "; to run on fewer devices, make only those visible to the process "
               "(CUDA_VISIBLE_DEVICES on GPUs, TPU_VISIBLE_CHIPS on TPUs)")
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation between constraints).

    `tensor` is the innermost (fastest-varying) axis so that tensor-parallel groups sit on neighbouring
    devices (one NVLink island / one TPU host).
    """
    devs = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devs))
    auto = (AxisType.Auto,) * 3
    if devices is None:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devs).reshape(shape), MESH_AXES, axis_types=auto)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    dev = jax.devices()[0] if device is None else device
    return make_mesh(1, 1, 1, devices=[dev])
