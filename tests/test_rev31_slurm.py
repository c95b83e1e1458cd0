"""Multi-host GPU jobs under SLURM: launch/slurm_gpu.sbatch run with fake `scontrol` / `srun` / `python` on PATH,
the start-up rendezvous on IPv6, and the GPUs a process takes under JAX's SLURM detection when srun binds them
per task."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import threading

import jax
import pytest

from jaxrl_llm import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")


def _fakes(tmp_path, hosts: int, python_rc: int = 0) -> tuple[dict[str, str], str]:
    """PATH with a fake scontrol (a long host list written in two parts, as a real one's stdio does), srun (records
    its options, then runs the task command of the first and the last node with their SLURM_PROCID) and python
    (records its settings)."""
    bin_, log = tmp_path / "bin", tmp_path / "log"
    bin_.mkdir()
    log.mkdir()
    q = shlex.quote(str(log))
    scripts = {
        "scontrol": '[[ "$1 $2" == "show hostnames" ]] || exit 2\necho "gpu-a01.cluster"\nsleep 0.3\n'
                    f'for i in $(seq 2 {hosts}); do echo "gpu-a$i.cluster"; done\n',
        "srun": f'printf "%s\\n" "$@" > {q}/srun.args\n'
                'while [[ "$1" == --* ]]; do shift; done\nrc=0\n'
                'for i in 0 $(( SLURM_NNODES - 1 )); do SLURM_PROCID=$i "$@" || rc=$?; done\nexit $rc\n',  # first, last
        "python": f'echo "$JAXRL_PROCESS_ID $JAXRL_NUM_PROCESSES $JAXRL_COORDINATOR $*" >> {q}/python.calls\n'
                  f'exit {python_rc}\n',
    }
    for name, body in scripts.items():
        (bin_ / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_ / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAXRL_"))}
    env.update(PATH=f"{bin_}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES=str(hosts),
               SLURM_JOB_NODELIST=f"gpu-a[01-{hosts}].cluster", SLURM_CPUS_PER_TASK="32")
    return env, str(log)


def test_sbatch_starts_one_process_per_node_with_its_cpus(tmp_path):
    """The README's sbatch command on a large allocation: `scontrol show hostnames ... | head -n 1` under pipefail
    ended the job with status 141 (scontrol killed by SIGPIPE once head had its line), before anything started;
    and srun (Slurm >= 22.05 does not inherit --cpus-per-task from sbatch) ran each process on one CPU."""
    env, log = _fakes(tmp_path, hosts=3000)
    r = subprocess.run(["bash", SBATCH, "--config", "configs/sft_smollm2.py", "--workdir", "/shared/runs/a b"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    srun = open(os.path.join(log, "srun.args")).read().splitlines()
    assert "--cpus-per-task=32" in srun and "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    calls = open(os.path.join(log, "python.calls")).read().splitlines()
    assert len(calls) == 2
    port = 20000 + 4242 * 2
    assert calls[0] == (f"0 3000 gpu-a01.cluster:{port} -m jaxrl_llm.train --config configs/sft_smollm2.py "
                        "--workdir /shared/runs/a b")
    assert calls[1].startswith(f"2999 3000 gpu-a01.cluster:{port} ")


def test_sbatch_passes_on_the_preempted_status(tmp_path):
    """A run stopped by SIGTERM (--signal=TERM@300, preemption) exits 143; the job says so too."""
    env, log = _fakes(tmp_path, hosts=2, python_rc=143)
    env.pop("SLURM_CPUS_PER_TASK")  # none asked for: srun gets no --cpus-per-task either
    r = subprocess.run(["bash", SBATCH, "--config", "configs/sft_tiny.py"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 143, r.stderr
    assert not any(a.startswith("--cpus-per-task") for a in open(os.path.join(log, "srun.args")).read().split())


def _meet(host: str) -> dict[int, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out: dict[int, str] = {}

    def run(pid: int) -> None:
        try:
            distributed.rendezvous(host, port, 2, pid, 3.0, f"[{host}]:{port - 1}")
            out[pid] = "ok"
        except distributed.DistributedError as e:
            out[pid] = str(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no IPv6 on this machine")
def test_rendezvous_on_an_ipv6_coordinator():
    """JAXRL_COORDINATOR=[v6]:port (split_address takes it, JAX's coordinator binds [::]): process 0 listened on IPv4
    only, so the others never reached it and the job failed after the whole start-up timeout."""
    assert _meet("::1") == {0: "ok", 1: "ok"}
    assert _meet("127.0.0.1") == {0: "ok", 1: "ok"}


SLURM_2_PER_NODE = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu-a[01-02]", "SLURM_NTASKS": "4",
                    "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                    "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


@pytest.mark.parametrize("visible, expected", [
    ("3", None),          # srun --gpus-per-task=1: its one GPU (the default [1] names a GPU it does not see)
    ("0,1,2,3", [1]),     # every task sees the node's GPUs: one each, by SLURM_LOCALID (JAX's default)
    (None, [1]),
])
def test_srun_direct_takes_the_gpus_slurm_bound_to_the_task(monkeypatch, visible, expected):
    """`srun --ntasks-per-node=2 --gpus-per-task=1 python -m jaxrl_llm.train` (JAX's SLURM detection, no JAXRL_*):
    SLURM_LOCALID=1 became local_device_ids=[1] while CUDA_VISIBLE_DEVICES held one GPU, so the second process of
    each node had no GPU (jax-ml/jax#28194)."""
    from jax._src.clusters import SlurmCluster

    for k in list(os.environ):
        if k.startswith(("SLURM_", "JAXRL_", "OMPI_")) or k in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
                                                                 "HIP_VISIBLE_DEVICES", "JAX_COORDINATOR_PORT"):
            monkeypatch.delenv(k)
    for k, v in SLURM_2_PER_NODE.items():
        monkeypatch.setenv(k, v)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv(distributed.ENV_RENDEZVOUS, "off")
    monkeypatch.setattr(distributed, "detect_cluster", lambda: SlurmCluster)
    monkeypatch.setattr(distributed, "_backend_started", lambda: False)
    seen = {}
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
    before = jax.config.jax_enable_preemption_service
    try:
        info = distributed.initialize()
    finally:
        jax.config.update("jax_enable_preemption_service", before)
    assert (info.process_id, info.num_processes, info.source) == (3, 4, "slurm")
    assert seen["coordinator_address"].startswith("gpu-a01:") and seen["local_device_ids"] == expected


@pytest.mark.parametrize("spec, node, procs", [("2(x3),1", "3", 1), ("2(x3),1", "0", 2), ("1,4", "", 4)])
def test_tasks_on_this_node(monkeypatch, spec, node, procs):
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", spec)
    monkeypatch.setenv("SLURM_NODEID", node)
    for k in ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(procs))))
    assert not distributed._devices_bound_per_process()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(procs - 1))))
    assert distributed._devices_bound_per_process()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
