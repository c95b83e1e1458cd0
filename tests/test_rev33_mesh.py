"""Mesh sizes: a bool is no axis size; a mesh smaller than the devices says how to use fewer of them."""

import pytest

from jaxrl_llm.parallel import MeshError, resolve_mesh_shape


@pytest.mark.parametrize("axis", ["data", "fsdp", "tensor"])
def test_bool_axis_size_refused(axis):
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, axis: True}
    with pytest.raises(MeshError, match=f"mesh.{axis}=True: each mesh axis must be a positive integer or -1"):
        resolve_mesh_shape(**sizes, num_devices=1)


def test_fewer_axes_than_devices_names_visible_devices():
    with pytest.raises(MeshError, match=r"= 4, but there are 8 devices.*CUDA_VISIBLE_DEVICES"):
        resolve_mesh_shape(1, 2, 2, num_devices=8)
    with pytest.raises(MeshError, match=r"= 16, but there are 8 devices; set one axis to -1[^;]*$"):
        resolve_mesh_shape(2, 4, 2, num_devices=8)
    assert resolve_mesh_shape(1, -1, 2, num_devices=8) == (1, 4, 2)
