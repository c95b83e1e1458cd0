"""GRPO dynamic batching (jaxrl_llm.rl_lengths.ChunkedPasses) on meshes: donation, output shardings, compile counts."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from test_dynamic_batching import CFG, P, _setup

from jaxrl_llm import distributed, models, parallel, rl_lengths
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.optim import make_optimizer
from jaxrl_llm.train import opt_state_shardings

# Minibatches of 12 of _setup's rows: every completion of ONE_WIDTH fits 32 columns (both microbatches (32, 32):
# make_train_step's one program); MIXED holds the 45- and 72-token ones (microbatches (32, 72) and (32, 32): grads,
# add, apply).
ONE_WIDTH = np.array([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 12, 13])
MIXED = np.array([4, 11, 14, 15, 6, 7, 8, 9, 0, 1, 2, 3])


def _batch():
    config, batch, _, rules, params = _setup(microbatches=2)
    config.grpo.positive_nll_weight = 0.3
    rng = np.random.default_rng(1)
    batch["advantages"] = np.repeat(rng.normal(size=(16, 1)), batch["input_ids"].shape[1], 1).astype(np.float32)
    batch["positive"] = (batch["advantages"][:, 0] > 0).astype(np.int32)
    for k, s in (("old_logprobs", 0.3), ("ref_logprobs", 0.2)):
        batch[k] = (-2.0 + s * rng.normal(size=batch["input_ids"].shape)).astype(np.float32)
    return config, batch, rules, jax.tree.map(np.asarray, params)


def _passes(config, rules, params_host, opt, mesh):
    """ChunkedPasses on `mesh` and a state placed as run_grpo places it (the step counter replicated)."""
    p_sh = models.param_shardings(CFG, mesh, rules)
    opt_sh = opt_state_shardings(opt, params_host, p_sh, mesh)
    passes = rl_lengths.ChunkedPasses(CFG, opt, config, mesh, rules, p_sh, opt_sh, 1)
    params = jax.device_put(params_host, p_sh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh):
        state = {"params": params, "opt_state": jax.jit(opt.init, out_shardings=opt_sh)(params),
                 "step": distributed.put_global(np.int32(0), replicated)}
    return passes, state, p_sh, opt_sh, replicated


def test_update_on_one_device_donates_no_unusable_buffer():
    """Both update paths on a one-device mesh (a single-GPU run): the state is donated and overwritten, and jax
    warns of no donated buffer it could not use. FAILED when the apply step also donated the fp32 gradient sums
    (donate_argnums=(0, 1)): no output has their shapes, so jax warned "Some donated buffers were not usable:
    float32[97,32], float32[32], ..." (every parameter's shape) at its compile, and gained nothing. (With several
    devices jax hands the donation to XLA instead and says nothing.)"""
    config, batch, rules, params_host = _batch()
    opt, _ = make_optimizer(1e-3, 10)
    mesh = parallel.single_device_mesh()
    passes, state, _, _, _ = _passes(config, rules, params_host, opt, mesh)
    lengths = rl_lengths.row_lengths(batch["attention_mask"], P)
    with warnings.catch_warnings(record=True) as caught, jax.set_mesh(mesh):
        warnings.simplefilter("always")
        for rows, widths in ((MIXED, [(32, 72), (32, 32)]), (ONE_WIDTH, [(32, 32), (32, 32)])):
            micro = passes.plan(rows, lengths, 2)
            assert [(c.prompt_width, c.completion_width) for c in micro] == widths
            before = jax.tree.leaves({k: state[k] for k in ("params", "opt_state")})
            state, _ = passes.update(state, batch, micro, jnp.bool_(False))
            assert all(x.is_deleted() for x in before)  # donated: the update wrote over the old state
    assert passes.shapes >= {("grads", 32, 72), ("step", 32, 32)}  # (both paths ran)
    unusable = [str(w.message) for w in caught if "donated buffers were not usable" in str(w.message)]
    assert not unusable, unusable[0][:300]


def test_update_on_a_mesh_keeps_shardings_and_compiles_once():
    """mesh (data=2, fsdp=2, tensor=2) and microbatches and log-prob chunks of 6 rows, not a multiple of the 4 batch
    devices (rules.sharding replicates them along fsdp, as batch_split_warning says). After each update on either
    path the parameters and the optimizer state have their shardings and the step counter the replicated one that
    run_grpo places (else the next call compiles again); a second round of the same widths, with other nll scales
    and on_policy values, compiles nothing; the values are those of the full-width step on one device."""
    config, batch, rules, params_host = _batch()
    opt = optax.adam(1e-2)
    mesh = parallel.make_mesh(2, 2, 2)
    assert "replicated along fsdp" in parallel.batch_split_warning(rules, mesh, {"a microbatch": 6})
    passes, state, p_sh, opt_sh, replicated = _passes(config, rules, params_host, opt, mesh)
    lengths = rl_lengths.row_lengths(batch["attention_mask"], P)
    compiles: list[str] = []

    def on_compile(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(str(kw.get("fun_name")))

    shardings = lambda tree: [x.sharding for x in jax.tree.leaves(tree)]
    jax.monitoring.register_event_duration_secs_listener(on_compile)
    try:
        with jax.set_mesh(mesh):
            for round_ in range(2):
                n0 = len(compiles)
                batch["positive"] = (np.arange(16) % (round_ + 2) == 0).astype(np.int32)  # another nll scale
                for j, rows in enumerate((ONE_WIDTH, MIXED)):
                    state, m = passes.update(state, batch, passes.plan(rows, lengths, 2), jnp.bool_(j == round_))
                    assert shardings(state["params"]) == jax.tree.leaves(p_sh)
                    assert shardings(state["opt_state"]) == jax.tree.leaves(opt_sh)
                    assert state["step"].sharding == replicated
                got = passes.logprobs("policy", passes.plan(MIXED, lengths, 2), state["params"],
                                      batch["input_ids"], batch["attention_mask"])
            assert compiles[n0:] == []  # (the first round's may come from the persistent compilation cache)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_compile)
    # one trace per (pass, widths) met, one for the sum and one for the apply step
    assert {k: f._cache_size() for k, f in passes._fns.items()} == {("step", 32): 1, ("grads", 32): 2,
                                                                     ("policy", 32): 2}
    assert passes._add._cache_size() == passes._apply._cache_size() == 1
    assert int(state["step"]) == 4
    # the same four updates and log-probs, full width, on one device
    ref_mesh = parallel.single_device_mesh()
    with jax.set_mesh(ref_mesh):
        ref = {"params": params_host, "opt_state": opt.init(params_host), "step": jnp.int32(0)}
        step = jax.jit(grpo.make_train_step(CFG, opt, config, rules))
        for round_ in range(2):
            batch["positive"] = (np.arange(16) % (round_ + 2) == 0).astype(np.int32)
            for j, rows in enumerate((ONE_WIDTH, MIXED)):
                ref, want = step(ref, {k: batch[k][rows] for k in grpo.BATCH_AXES}, jnp.bool_(j == round_))
        lp = jax.jit(grpo.make_logprobs_fn(CFG, 0.7, 1, rules, first_target=P))(
            ref["params"], batch["input_ids"], batch["attention_mask"])
    for k in want:
        np.testing.assert_allclose(float(m[k]), float(want[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    for g, w in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    mask = batch["loss_mask"][MIXED] > 0
    np.testing.assert_allclose(got[MIXED][mask], np.asarray(lp)[MIXED][mask], rtol=1e-4, atol=1e-4)
