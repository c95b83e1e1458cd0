"""Run by tests/test_multihost.py under launch/local_multiprocess.sh (2 processes x 4 CPU devices): exercises the
multi-process data movement GRPO relies on and prints one JSON line per process for the test to check."""

import json
import os

import numpy as np

from jaxrl_llm import distributed

distributed.initialize()

import jax  # noqa: E402  (after the distributed start-up)
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxrl_llm import parallel  # noqa: E402
from jaxrl_llm.environments import EnvResult, score_across_processes  # noqa: E402

me = jax.process_index()


class Recorder:
    """Reward = the completion read as a number; remembers what this process was asked to score."""

    name = "recorder"

    def __init__(self):
        self.seen: list[str] = []

    def score(self, prompts, completions, metadata):
        self.seen += completions
        return EnvResult(np.array([float(c) for c in completions], np.float32),
                         [{"scored_by": me, "tag": m["tag"]} for m in metadata],
                         {"calls": 1, f"rows_p{me}": len(completions)})


env = Recorder()
completions = [str(i) for i in range(7)]
res = score_across_processes(env, ["q"] * 7, completions, [{"tag": f"t{i}"} for i in range(7)])

mesh = parallel.make_mesh(1, -1, 1)
rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))  # 16 rows over 8 devices in 2 processes
x = np.arange(48, dtype=np.float32).reshape(16, 3)
g = distributed.put_global(x, rows)
off = distributed.offload({"g": g})
on = distributed.onload(off)
try:  # process 1's value cannot be written as JSON: both processes must learn it, neither may wait forever
    distributed.allgather_json({"tags": {"x"}} if me == 1 else {"tags": []})
    unserialisable = "no error"
except TypeError as e:
    unserialisable = str(e)
# A workdir the test process holds: every process of the job refuses it alike. A free one: process 0 locks it for
# the whole job (its note says so) and lets go at the end.
from jaxrl_llm.cli import ConfigError  # noqa: E402
from jaxrl_llm.workdir import hold_workdir  # noqa: E402

try:
    with hold_workdir(os.environ["HELD_WORKDIR"]):
        held = "entered"
except ConfigError as e:
    held = str(e)
with hold_workdir(os.environ["FREE_WORKDIR"]):
    with open(os.path.join(os.environ["FREE_WORKDIR"], "run.lock")) as f:
        lock_note = f.read()
    distributed.allgather_json(me)  # both inside
print("RESULT " + json.dumps({
    "held": held, "lock_note": lock_note, "pid": os.getpid(),
    "process": me, "seen": env.seen, "rewards": res.rewards.tolist(), "info": res.info, "counts": res.counts,
    "addressable": g.is_fully_addressable, "local_rows": sorted({int(s.index[0].start) for s in g.addressable_shards}),
    "gathered": distributed.to_host(g).tolist(), "offload_kind": off["g"].sharding.memory_kind,
    "onload_kind": on["g"].sharding.memory_kind, "roundtrip": distributed.to_host(on["g"]).tolist(),
    "objects": distributed.allgather_json({"p": me, "x": [me] * (me + 1)}),
    "unserialisable": unserialisable,
}), flush=True)
