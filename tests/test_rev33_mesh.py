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


def test_decode_casts_only_weights_wider_than_the_compute_dtype():
    """fp32 weights with bf16 compute are cast once per decode call (2 bytes a weight a step instead of 4); bf16
    weights with fp32 compute are not widened into an fp32 copy (twice the memory and the bytes a step reads)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxrl_llm import models
    from jaxrl_llm.sampling import budget, loop

    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                             num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64,
                             tie_word_embeddings=True)
    params = models.init_params(cfg, jax.random.key(0))
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    narrow = dataclasses.replace(cfg, compute_dtype="bfloat16")
    out = loop.step_weights_in_compute_dtype(narrow, params)
    assert {a.dtype for a in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}
    assert budget.cast_copy_bytes(narrow, params) > 0
    out = loop.step_weights_in_compute_dtype(cfg, bf16)  # fp32 compute, bf16 weights: left as stored
    assert all(a is b for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(bf16), strict=True))
    assert budget.cast_copy_bytes(cfg, bf16) == 0
    assert not loop.narrows(jnp.float16, jnp.bfloat16) and loop.narrows(jnp.float32, jnp.float16)
