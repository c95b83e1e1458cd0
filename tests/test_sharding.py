"""One mesh: parameters load straight into their sharded layout and sharded logits equal 1-device logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hf_models import build_hf_model, mixed_padding_batch, tiny_hf_config
from jax.sharding import PartitionSpec as P

from jaxrl_llm import models, parallel


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # vocab 96, width 48, MLP 80, 4 heads / 2 kv heads: divisible by every mesh axis used below.
    hf = build_hf_model(tiny_hf_config("qwen2", heads=4, kv_heads=2, vocab=96, tie=False))
    d = tmp_path_factory.mktemp("qwen2")
    hf.save_pretrained(d)
    return str(d)


def test_eight_fake_devices():
    assert jax.device_count() == 8, "conftest sets --xla_force_host_platform_device_count=8"


MESHES = [dict(data=1, fsdp=8, tensor=1), dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)]


@pytest.mark.parametrize("shape", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_sharded_logits_equal_single_device(folder, shape):
    cfg, p1 = models.load_pretrained(folder)
    ids, mask = mixed_padding_batch(cfg.vocab_size, lengths=(9, 5, 12, 7, 3, 12, 8, 10), T=12)
    ref = np.asarray(models.forward(cfg, p1, ids, mask))

    mesh = parallel.make_mesh(**shape)
    _, params = models.load_pretrained(folder, mesh=mesh)
    rules = parallel.ShardingRules()
    expected = models.param_shardings(cfg, mesh, rules)
    for (path, x), (_, sh) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                  jax.tree_util.tree_flatten_with_path(expected)[0], strict=True):
        assert x.sharding.is_equivalent_to(sh, x.ndim), (path, x.sharding, sh)
    logits = models.sharded_forward(cfg, mesh, rules)(params, ids, mask)
    assert logits.addressable_shards[0].data.shape[0] < ids.shape[0]  # the batch stays sharded
    out = np.asarray(logits)
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= 1e-5


def test_rules_table_gives_the_documented_specs(folder):
    """Written out by hand for mesh (fsdp=4, tensor=2): what each parameter's sharding must be."""
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    _, params = models.load_pretrained(folder, mesh=mesh)
    want = {
        "embed": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
        "final_norm": P(),
        ("layers", "wq"): P(None, "fsdp", "tensor"),
        ("layers", "wk"): P(None, "fsdp", "tensor"),
        ("layers", "wo"): P(None, "tensor", None, "fsdp"),
        ("layers", "bq"): P(None, "tensor"),
        ("layers", "w_gate"): P(None, "fsdp", "tensor"),
        ("layers", "w_down"): P(None, "tensor", "fsdp"),
        ("layers", "attn_norm"): P(),
    }
    for key, spec in want.items():
        x = params[key[0]][key[1]] if isinstance(key, tuple) else params[key]
        assert x.sharding.spec == spec, (key, x.sharding.spec, spec)
        # Each device really holds only its slice.
        n_shards = int(np.prod([mesh.shape[a] for a in spec if a is not None]))
        assert x.addressable_shards[0].data.size * n_shards == x.size


def test_indivisible_dimensions_fall_back_to_replication():
    rules = parallel.ShardingRules()
    # 3 kv heads cannot be split over tensor=2: that dim is replicated; embed 576 still splits over fsdp.
    mesh_shape = {"data": 1, "fsdp": 4, "tensor": 2}
    spec = rules.spec(("layers", "embed", "kv_heads", "head_dim"), (30, 576, 3, 64), mesh_shape)
    assert spec == P(None, "fsdp")
    # A mesh axis is used once per array: batch takes (data, fsdp), so embed is not sharded again.
    assert rules.spec(("batch", "length", "embed"), (8, 4, 16), {"data": 2, "fsdp": 2, "tensor": 2}) == P(
        ("data", "fsdp"))


def test_batch_split_warning_names_the_rows_and_the_lost_axes():
    rules = parallel.ShardingRules()
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    assert parallel.batch_split_warning(rules, mesh, {"train.batch_size": 8, "a microbatch": 4}) is None
    # 6 rows split over data=2 but not over data x fsdp = 4: fsdp is lost (replicated), data kept.
    w = parallel.batch_split_warning(rules, mesh, {"train.batch_size": 8, "a microbatch": 6})
    assert w is not None and w.startswith("a microbatch=6 rows") and "replicated along fsdp (" in w
    assert "multiple of 4" in w
    w = parallel.batch_split_warning(rules, mesh, {"train.batch_size": 3})
    assert "replicated along data, fsdp (" in w
    # Mesh axes of size 1 are never reported; the tensor axis is not a batch axis.
    one = parallel.make_mesh(data=1, fsdp=1, tensor=8)
    assert parallel.batch_split_warning(rules, one, {"train.batch_size": 3}) is None


def test_mesh_shapes_and_errors():
    assert parallel.resolve_mesh_shape(1, -1, 2, 8) == (1, 4, 2)
    assert parallel.resolve_mesh_shape(2, 2, -1, 8) == (2, 2, 2)
    with pytest.raises(parallel.MeshError, match="not divisible"):
        parallel.resolve_mesh_shape(1, -1, 3, 8)
    with pytest.raises(parallel.MeshError, match="only one axis"):
        parallel.resolve_mesh_shape(-1, -1, 1, 8)
    with pytest.raises(parallel.MeshError, match="8 devices"):
        parallel.resolve_mesh_shape(1, 2, 2, 8)
    with pytest.raises(parallel.MeshError, match="mesh.tensor=0"):
        parallel.resolve_mesh_shape(1, -1, 0, 8)


def test_init_params_sharded(folder):
    cfg, _ = models.load_pretrained(folder)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    params = models.init_params(cfg, jax.random.key(0), mesh=mesh)
    assert params["layers"]["w_up"].sharding.spec == P(None, "fsdp", "tensor")
    ref = models.init_params(cfg, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(params["layers"]["w_up"]), np.asarray(ref["layers"]["w_up"]))


class _Watched(np.ndarray):
    """A checkpoint tensor that records how much of it is read at a time (slices taken, whole-array conversions)."""

    reads: list[tuple[str, str, int, int]] = []

    def __array_finalize__(self, obj):
        self.tensor_name = getattr(obj, "tensor_name", None)
        self.full_size = getattr(obj, "full_size", None)

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        if isinstance(out, np.ndarray):
            _Watched.reads.append((self.tensor_name, "slice", out.size, self.full_size))
        return out

    def astype(self, *args, **kwargs):
        _Watched.reads.append((self.tensor_name, "astype", self.size, self.full_size))
        return super().astype(*args, **kwargs)


def test_loading_reads_only_each_devices_slice_of_a_tensor(folder):
    """make_array_from_callback asks each (addressable) device for its slice; the loader must read and convert
    just that slice of the memory-mapped tensor, so a process of a multi-host job never reads a whole sharded
    tensor (in one process with 8 devices: 8 slices, never the whole)."""
    from jaxrl_llm.models import hf_io

    src = hf_io.HFFolderSource(folder)
    get = src.get

    def watched(name):
        x = get(name).view(_Watched)
        x.tensor_name, x.full_size = name, x.size
        return x

    src.get = watched
    cfg, _ = models.load_pretrained(folder)
    _Watched.reads = []
    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    params = hf_io.load_params_from_source(cfg, src, mesh=mesh)
    by_name: dict[str, list[tuple[str, int, int]]] = {}
    for name, kind, size, full in _Watched.reads:
        by_name.setdefault(name, []).append((kind, size, full))
    sharded = {n for n, r in by_name.items() if any(size < full for _, size, full in r)}
    assert "model.embed_tokens.weight" in sharded and "model.layers.0.mlp.up_proj.weight" in sharded
    assert len(sharded) >= 7 * cfg.num_layers  # q/k/v/o and the three MLP matrices of every layer
    for n in sharded:
        assert all(kind == "slice" and size * 8 == full for kind, size, full in by_name[n]), (n, by_name[n])
        assert len(by_name[n]) == 8
    _, ref = models.load_pretrained(folder)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_the_embedding_lookup_needs_no_full_rematerialization(capfd, shared_prefix):
    """On a (data=2, fsdp=2, tensor=2) mesh the table is sharded [vocab/tensor, width/fsdp]: looked up as it
    is, XLA could not keep the rows sharded like the batch and replicated the whole lookup (it says so on
    stderr). The width is gathered first, as FSDP gathers every weight; the gradient is unchanged."""
    import jax.numpy as jnp

    from jaxrl_llm.models.shared_prefix import shared_prefix_hidden_states

    cfg = models.ModelConfig(family="llama", vocab_size=1000, hidden_size=64, intermediate_size=96, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    rules, mesh = parallel.ShardingRules(), parallel.make_mesh(2, 2, 2)
    params = models.init_params(cfg, jax.random.key(0), mesh=mesh, rules=rules)
    ids = np.random.default_rng(0).integers(0, 1000, (8, 152)).astype(np.int32)

    def loss(p, ids, rules):
        if shared_prefix:
            h_prompt, h_cont = shared_prefix_hidden_states(cfg, p, ids[:, :100], jnp.ones((8, 100), jnp.int32),
                                                           ids[:, None, 100:], jnp.ones((8, 1, 52), jnp.int32),
                                                           rules=rules)
            return (h_prompt.sum() + h_cont.sum()) / 1e3
        return models.forward(cfg, p, ids, rules=rules).mean()

    with jax.set_mesh(mesh):
        placed = jax.device_put(ids, rules.sharding(mesh, ("batch", "length"), ids.shape))
        grads = jax.jit(jax.grad(loss), static_argnums=2)(params, placed, rules)
        jax.block_until_ready(grads)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    single = jax.grad(loss)(jax.device_get(params), ids, None)
    np.testing.assert_allclose(np.asarray(grads["embed"]), np.asarray(single["embed"]), atol=1e-5, rtol=1e-4)
