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


def test_fused_attention_in_float16_refused_on_cpu():
    """XLA:CPU has no float16 product with fp32 accumulation: the run stopped inside the first jitted step."""
    from configs import sft_tiny
    from jaxrl_llm import train
    from jaxrl_llm.cli import ConfigError

    config = sft_tiny.get_config()
    config.model.attention_impl = "fused"
    config.model.compute_dtype = "float16"
    with pytest.raises(ConfigError, match=r"model.attention_impl='fused' with model.compute_dtype='float16'"):
        train.validate(config)
    config.model.compute_dtype = "bfloat16"
    train.validate(config)
