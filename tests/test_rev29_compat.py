"""A run folder written by an older commit, or with other settings, read by the current code: each mismatch is a
one-line error that says what to do, never a wrong restore or advice that loses checkpoints (rev29, compat)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.models import CheckpointError
from jaxrl_llm.optim import make_optimizer


def test_an_intact_checkpoint_of_another_optimizer_layout_is_not_called_damaged(tmp_path):
    """optimizer.grad_clip turned off on a resume (or a checkpoint of a version whose optimizer chain differs):
    the optimizer state has another tree; the error said 'damaged; move that folder aside', and every older step
    fails the same way."""
    params = {"w": jnp.ones((4, 4))}
    clipped, _ = make_optimizer(lr=1e-3, max_steps=4, grad_clip=1.0)
    plain, _ = make_optimizer(lr=1e-3, max_steps=4, grad_clip=0.0)
    d = str(tmp_path / "checkpoints")
    ck = Checkpointer(d, every_steps=1, keep=3, async_save=False)
    for step in (1, 2):
        ck.maybe_save(step, {"params": params, "opt_state": clipped.init(params)}, {"step": step})
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          {"params": params, "opt_state": plain.init(params)})
    with pytest.raises(CheckpointError) as e:
        ck.restore(target)
    msg = str(e.value)
    assert msg.startswith(f"{d}/2: cannot restore ['opt_state', 'params']")
    assert "intact" in msg and "grad_clip" in msg and "run_config.json" in msg and "jaxrl_llm.export" in msg
    assert "damaged" not in msg and "move that folder aside" not in msg and "partial_restore" not in msg
    items, _, step = ck.restore({"params": target["params"]})  # its parameters alone still read (export)
    assert step == 2 and float(items["params"]["w"][0, 0]) == 1.0
    ck.close()
