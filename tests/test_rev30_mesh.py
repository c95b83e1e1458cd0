"""Review 30 (meshes): model dimensions that do not divide a mesh axis, and batches that do not split over it.

A dimension that does not divide its mesh axis is replicated along it (rules.spec): correct numbers, but each device
holds those parameters whole. That is said once, where the parameters are placed, naming the mesh key and the
model dimension. Runs on the 8 fake CPU devices of tests/conftest.py.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from jaxrl_llm import models, parallel
from jaxrl_llm.models.params import replication_warning

# vocab 1001, 6 query heads, 2 kv heads: none divides tensor=4; width 40 and MLP 96 divide 2 and 4.
ODD = models.ModelConfig(family="llama", vocab_size=1001, hidden_size=40, intermediate_size=96, num_layers=1,
                         num_heads=6, num_kv_heads=2, head_dim=8, tie_word_embeddings=False)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_replication_warning_names_the_mesh_key_and_the_dimension():
    w = replication_warning(ODD, {"data": 1, "fsdp": 2, "tensor": 4})
    assert w.startswith("mesh.tensor=4 does not divide vocab_size=1001 (embed, lm_head) or num_heads=6 "
                        "(layers/wq, layers/wo) or num_kv_heads=2 (layers/wk, layers/wv): those parameters are "
                        "replicated along tensor"), w
    assert "about 3.62x the parameter and optimizer memory" in w and "\n" not in w
    # fsdp splits the width (40 / 8 = 5) and the vocabulary is not asked to split over fsdp or data: nothing to say.
    assert replication_warning(ODD, {"data": 1, "fsdp": 8, "tensor": 1}) is None
    assert replication_warning(ODD, {"data": 8, "fsdp": 1, "tensor": 1}) is None
    w = replication_warning(ODD, {"data": 1, "fsdp": 1, "tensor": 8})  # MLP 96 = 8 x 12 still splits
    assert "intermediate_size" not in w and "num_kv_heads=2" in w


def test_params_placed_on_a_mesh_they_do_not_split_over_are_warned(caplog, tmp_path):
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
    said = "mesh.tensor=4 does not divide vocab_size=1001"
    with caplog.at_level(logging.WARNING):  # (traced only: the warning comes before any compile)
        jax.eval_shape(lambda: models.init_params(ODD, 0, mesh=mesh))
    assert [w for w in _warnings(caplog) if w.startswith(said)], _warnings(caplog)
    host = jax.tree.map(lambda a: jax.numpy.asarray(np.ones(a.shape, np.float32)), models.abstract_params(ODD))
    models.save_pretrained(ODD, host, str(tmp_path / "odd"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, params = models.load_pretrained(str(tmp_path / "odd"), mesh=mesh)
    assert [w for w in _warnings(caplog) if w.startswith(said)], _warnings(caplog)
    assert params["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # (what it says)


@pytest.mark.parametrize("rows, said", [
    ({"train.batch_size": 6, "a microbatch": 3}, "a microbatch=3 rows"),  # 3 loses data and fsdp, 6 only fsdp
    ({"train.batch_size": 6, "a microbatch": 6}, "train.batch_size=6 rows"),
])
def test_batch_split_warning_says_the_rows_that_lose_most(rows, said):
    w = parallel.batch_split_warning(parallel.ShardingRules(), parallel.make_mesh(2, 2, 2), rows)
    assert w.startswith(said), w
    assert ("replicated along data, fsdp (" in w) == (said.startswith("a microbatch"))
