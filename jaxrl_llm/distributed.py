"""Multi-host jobs on JAX's multi-controller runtime: start-up (`initialize`) and process-local batches.

One process per host owns all of that host's accelerators; every process runs the same program on the same
global mesh. Start-up settings, first found wins:
  1. arguments / command-line flags (--coordinator_address, --num_processes, --process_id, --init_timeout_s);
  2. environment: JAXRL_COORDINATOR (host:port of process 0), JAXRL_NUM_PROCESSES, JAXRL_PROCESS_ID,
     JAXRL_INIT_TIMEOUT_S (default 300), JAXRL_LOCAL_DEVICE_IDS ("0,1,..."; default: all local devices);
  3. JAX's own cluster detection (SLURM under srun, Cloud TPU pod metadata, Open MPI under mpirun); several
     processes per host take one GPU each (by SLURM_LOCALID), or all they see when srun bound GPUs per task;
  4. none of these: a single process, and `initialize` does nothing. JAXRL_DISTRIBUTED=off skips 2-3.

Bounded start-up: before JAX's own handshake (which aborts the process with an opaque message when a peer is
missing), the processes meet on a small TCP rendezvous at the coordinator's port + 1 (JAXRL_RENDEZVOUS_PORT
overrides it; JAXRL_RENDEZVOUS=off skips it): process 0 waits up to the timeout for the others and otherwise
fails with a one-line `DistributedError` naming the coordinator, the expected count and the ids that never
connected; the others fail with one line when process 0 cannot be reached or reports the failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxrl_llm.parallel.rendezvous import ENV_RENDEZVOUS_PORT, DistributedError, rendezvous

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
ENV_COORDINATOR = "JAXRL_COORDINATOR"
ENV_NUM_PROCESSES = "JAXRL_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXRL_PROCESS_ID"
ENV_TIMEOUT = "JAXRL_INIT_TIMEOUT_S"
ENV_LOCAL_DEVICE_IDS = "JAXRL_LOCAL_DEVICE_IDS"
ENV_MODE = "JAXRL_DISTRIBUTED"
ENV_RENDEZVOUS = "JAXRL_RENDEZVOUS"
_OFF = ("off", "0", "false", "no", "none")


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    process_id: int
    num_processes: int
    coordinator: str | None  # None for a single process
    source: str  # "single" | "explicit" | the detected cluster ("slurm", "ompi", "gce_tpu", ...)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: float | None = None,
               local_device_ids: Sequence[int] | None = None, graceful_sigterm: bool = True) -> DistributedInfo:
    """Join (or start) the multi-process job, or do nothing for a single process. Idempotent.

    graceful_sigterm: JAX's preemption service catches SIGTERM, and the training loops stop at a step all processes
    agree on, with a checkpoint (jaxrl_llm.preemption); False (evaluation, which has nothing to save): SIGTERM ends
    the process at once, as it does a single process.

    Must run before anything initialises a JAX backend (jax.devices(), a computation) when more than one
    process is configured. Raises DistributedError (one line) on bad settings or a missing peer, within
    `timeout_s` (plus a few seconds) of being called.
    """
    if jax.distributed.is_initialized():
        return current()
    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES, minimum=1)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID, minimum=0)
    if timeout_s is None:
        timeout_s = _env_float(ENV_TIMEOUT)
        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    if timeout_s <= 0:
        raise DistributedError(f"{ENV_TIMEOUT} / init_timeout_s={timeout_s}: must be > 0 seconds")
    if local_device_ids is None and env.get(ENV_LOCAL_DEVICE_IDS):
        local_device_ids = _parse_ids(env[ENV_LOCAL_DEVICE_IDS], ENV_LOCAL_DEVICE_IDS)

    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    source = "explicit"
    if num_processes == 1 and not coordinator_address:
        return DistributedInfo(0, 1, None, "single")
    cluster = None
    if env.get(ENV_MODE, "auto").strip().lower() not in _OFF:
        cluster = detect_cluster()
    if not explicit and cluster is None:
        return DistributedInfo(0, 1, None, "single")
    if cluster is not None and None in (coordinator_address, num_processes, process_id):
        source = cluster.name
        coordinator_address, num_processes, process_id, detected_ids = _from_cluster(
            cluster, coordinator_address, num_processes, process_id, timeout_s)
        if local_device_ids is None and detected_ids is not None and _one_process_per_host() is False:
            if _devices_bound_per_process():  # e.g. srun --gpus-per-task=1: the devices it sees are its own
                log.info("process %d sees %s only (the launcher's per-task binding): it uses all of them",
                         process_id, _visible_devices_env())
            else:
                local_device_ids = detected_ids  # several processes per host: one device each (JAX's default)
    missing = [name for name, v in ((f"coordinator ({ENV_COORDINATOR})", coordinator_address),
                                    (f"num_processes ({ENV_NUM_PROCESSES})", num_processes),
                                    (f"process_id ({ENV_PROCESS_ID})", process_id)) if v is None]
    if missing:
        raise DistributedError(f"multi-process start-up needs {', '.join(missing)} (no cluster was detected to "
                               "supply them)")
    assert coordinator_address is not None and num_processes is not None and process_id is not None
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id={process_id} ({ENV_PROCESS_ID}) must lie in [0, num_processes="
                               f"{num_processes})")
    if num_processes == 1:  # e.g. a one-task SLURM step: nothing to join
        return DistributedInfo(0, 1, None, "single")
    host, port = split_address(coordinator_address)
    use_rendezvous = env.get(ENV_RENDEZVOUS, "on").strip().lower() not in _OFF
    rdv_port = rendezvous_port(port, _env_int(ENV_RENDEZVOUS_PORT, minimum=1)) if use_rendezvous else 0
    if rdv_port > 65535:
        raise DistributedError(f"rendezvous port {rdv_port} ({ENV_RENDEZVOUS_PORT}) is not a TCP port")
    if _backend_started():
        raise DistributedError(f"{num_processes} processes configured (coordinator {coordinator_address}), but a "
                               "JAX backend is already running in this process: start-up must come before "
                               "jax.devices() or any computation")
    origin = "given explicitly" if source == "explicit" else f"detected from the {source} environment" + (
        " (SLURM_NTASKS, SLURM_PROCID)" if source == "slurm" else "")
    log.info("process %d of %d: waiting up to %.0f s for the job's other processes at %s (the job's size was %s)",
             process_id, num_processes, timeout_s, coordinator_address, origin)
    if use_rendezvous:
        try:
            rendezvous(host, rdv_port, num_processes, process_id, timeout_s, coordinator_address)
        except DistributedError as e:
            raise DistributedError(f"{e}; the job's size was {origin}") from None
    jax.config.update("jax_enable_preemption_service", graceful_sigterm)
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   cluster_detection_method="deactivate",
                                   initialization_timeout=max(1, int(timeout_s + 0.999)))
    except RuntimeError as e:
        raise DistributedError(f"jax.distributed.initialize (coordinator {coordinator_address}, process "
                               f"{process_id} of {num_processes}): {str(e).splitlines()[0]}") from e
    log.info("process %d of %d joined the job (coordinator %s, %s)", process_id, num_processes,
             coordinator_address, source)
    return DistributedInfo(process_id, num_processes, coordinator_address, source)


def define_flags() -> None:
    """--coordinator_address, --num_processes, --process_id, --init_timeout_s (programs call this once)."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None, f"host:port of process 0 (or {ENV_COORDINATOR}).")
    flags.DEFINE_integer("num_processes", None, f"Processes in the job (or {ENV_NUM_PROCESSES}).")
    flags.DEFINE_integer("process_id", None, f"This process's id in [0, num_processes) (or {ENV_PROCESS_ID}).")
    flags.DEFINE_bool("log_all_processes", False, "In a job of several processes, every process logs its INFO "
                                                  "lines (default: process 0 only; the others log warnings/errors).")
    flags.DEFINE_float("init_timeout_s", None, f"Start-up timeout in seconds (or {ENV_TIMEOUT}; default "
                                               f"{DEFAULT_TIMEOUT_S:g}).")


def initialize_from_flags(graceful_sigterm: bool = True) -> DistributedInfo:
    """`initialize` with the values of the flags from `define_flags` (unset flags fall back to the environment)."""
    from absl import flags

    F = flags.FLAGS
    info = initialize(coordinator_address=F.coordinator_address, num_processes=F.num_processes,
                      process_id=F.process_id, timeout_s=F.init_timeout_s, graceful_sigterm=graceful_sigterm)
    quiet_other_processes(info, F.log_all_processes)
    return info


def quiet_other_processes(info: DistributedInfo, log_all: bool = False) -> None:
    """In a job of several processes, only process 0 logs our INFO lines (data statistics, "wrote ...", "done:");
    the others log warnings and errors: a 64-host job's log would hold every line 64 times. log_all: all log."""
    if info.num_processes > 1 and not log_all:
        if info.process_id:
            logging.getLogger("jaxrl_llm").setLevel(logging.WARNING)
        else:
            log.info("processes 1-%d of this job log warnings and errors only (--log_all_processes: all lines)",
                     info.num_processes - 1)


def current() -> DistributedInfo:
    """The job as JAX sees it (after `initialize`, or a single process)."""
    if not jax.distributed.is_initialized():
        return DistributedInfo(0, 1, None, "single")
    from jax._src import distributed as _jd

    st = _jd.global_state
    return DistributedInfo(st.process_id, st.num_processes, st.coordinator_address, "initialized")


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); errors name the address."""
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", address.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise DistributedError(f"coordinator address {address!r} ({ENV_COORDINATOR}): expected host:port")
    return m.group(1), int(m.group(2))


# ----------------------------------------------------------------------------------------------- detection


def detect_cluster() -> Any | None:
    """The JAX cluster environment this process runs in (SLURM step, Open MPI, Cloud TPU, ...) or None."""
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover (private module moved)
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method:
            continue
        try:
            if env.is_env_present():
                return env
        except Exception:  # noqa: BLE001 (a detector probing metadata servers must not break start-up)
            continue
    return None


def _from_cluster(cluster: Any, coordinator: str | None, n: int | None, pid: int | None, timeout_s: float):
    from jax._src import clusters

    try:
        return clusters.ClusterEnv.auto_detect_unset_distributed_params(
            coordinator, n, pid, None, cluster.name, int(timeout_s))
    except Exception as e:  # noqa: BLE001 (name the detector in one line)
        raise DistributedError(f"cluster detection ({cluster.name}) failed: {e}") from e


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # pragma: no cover (private API moved: let JAX itself complain)
        return False


def _slurm_task_counts() -> list[int]:
    """SLURM's tasks per node of this step, one per node: "2(x3),1" -> [2, 2, 2, 1]; [] outside SLURM."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or ""
    return [int(n) for n, rep in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec) for _ in range(int(rep or 1))]


def _one_process_per_host() -> bool | None:
    """From the launcher's per-node task counts: True / False, or None when unknown."""
    if counts := _slurm_task_counts():
        return max(counts) == 1
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    return int(local) == 1 if local else None


def _visible_devices_env() -> str | None:
    """'CUDA_VISIBLE_DEVICES=...' (or ROCm's) as the launcher set it, or None."""
    return next((f"{k}={os.environ[k]}" for k in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
                                                  "HIP_VISIBLE_DEVICES") if k in os.environ), None)


def _devices_bound_per_process() -> bool:
    """Whether the launcher gave each process of this host its own GPUs (SLURM's --gpus-per-task, --gpu-bind): it
    sees fewer GPUs than the host runs processes (SLURM's count at SLURM_NODEID, Open MPI's local size), so JAX's
    default, the GPU numbered SLURM_LOCALID among those it sees, would name one it lacks or idle the others."""
    counts, node = _slurm_task_counts(), os.environ.get("SLURM_NODEID", "")
    if counts:
        procs = counts[int(node)] if node.isdigit() and int(node) < len(counts) else max(counts)
    else:
        local = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "")
        procs = int(local) if local.isdigit() else 0
    visible = _visible_devices_env()
    return visible is not None and len([x for x in visible.split("=", 1)[1].split(",") if x.strip()]) < procs


# ----------------------------------------------------------------------------------------------- batches


def process_rows(sharding: jax.sharding.Sharding, global_shape: Sequence[int]) -> list[int]:
    """The rows (dim 0) of a global array of `global_shape` that this process's devices hold, in the order
    `jax.make_array_from_process_local_data` expects them (all rows when dim 0 is not split across processes)."""
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    n = int(global_shape[0])
    spans = sorted({idx[0].indices(n)[:2] for idx in index_map.values()})
    size = spans[0][1] - spans[0][0]
    rows = [r for lo, _ in spans for r in range(lo, lo + size)]
    return rows if len(rows) < n else list(range(n))


def batch_rows(shardings: Mapping[str, jax.sharding.Sharding], global_size: int,
               trailing: Mapping[str, Sequence[int]]) -> list[int]:
    """The global-batch rows this process must build: the union (in order) over the batch's arrays."""
    rows: set[int] = set()
    for k, sh in shardings.items():
        rows.update(process_rows(sh, (global_size, *trailing[k])))
    return sorted(rows)


def put_local_batch(local: Mapping[str, np.ndarray], rows: Sequence[int],
                    shardings: Mapping[str, jax.sharding.Sharding], global_size: int) -> dict[str, jax.Array]:
    """Global arrays of `global_size` rows from this process's rows (`local[k][i]` is global row `rows[i]`).

    A single process holding every row gives exactly `jax.device_put(local, shardings)`.
    """
    pos = {r: i for i, r in enumerate(rows)}
    out = {}
    for k, arr in local.items():
        if arr.shape[0] != len(rows):
            raise ValueError(f"batch[{k!r}] has {arr.shape[0]} rows; this process built {len(rows)}")
        shape = (global_size, *arr.shape[1:])
        need = process_rows(shardings[k], shape)
        part = arr if need == list(rows) else arr[np.asarray([pos[r] for r in need], np.int64)]
        out[k] = jax.make_array_from_process_local_data(shardings[k], part, shape)
    return out


def _env_int(name: str, minimum: int) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        v = int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r}: expected an integer") from None
    if v < minimum:
        raise DistributedError(f"{name}={v}: must be >= {minimum}")
    return v


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r}: expected a number of seconds") from None


def _parse_ids(raw: str, name: str) -> list[int]:
    try:
        return [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise DistributedError(f"{name}={raw!r}: expected comma-separated device ids, e.g. 0,1,2,3") from None


# ------------------------------------------------------------------------------ host copies and gathers


def put_global(x: np.ndarray | Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host value that every process holds in full (e.g. the step's prompts or a GRPO
    batch built identically everywhere): each process places only the slices its devices own. With one
    process this is `jax.device_put`."""
    x = np.asarray(x)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) array on every process: fetched directly when this process
    holds all of it (fully addressable or replicated), else gathered from all processes (a collective: every
    process must call it)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def json_default(v: Any, *, strict: bool = True) -> Any:
    """json's `default` for numpy scalars and arrays. Anything else: a TypeError when `strict` (a scorer's
    non-JSON info fails loudly rather than being gathered as a string), else its str()."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if strict:
        raise TypeError(f"{type(v).__name__} is not JSON-serialisable")
    return str(v)


def rendezvous_port(coordinator_port: int, explicit: int | None = None) -> int:
    """The start-up check's port: `explicit`, else the coordinator's + 1, or - 1 for the top port (JAX's SLURM
    detection picks 61440 + job id % 4096, which reaches 65535)."""
    if explicit:
        return explicit
    return coordinator_port + 1 if coordinator_port < 65535 else coordinator_port - 1


def allgather_json(obj: Any) -> list[Any]:
    """[obj of process 0, obj of process 1, ...] on every process, for small JSON-able values (per-sample
    rewards and scorer info, event counts). A collective: every process must call it. One process: [obj]."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    try:
        data = np.frombuffer(json.dumps(obj, default=json_default).encode(), np.uint8)
        failure = None
    except (TypeError, ValueError) as e:  # still take part in the gathers below, or the others wait forever
        data, failure = np.zeros(0, np.uint8), f"{type(e).__name__}: {e}"
    sizes = np.asarray(multihost_utils.process_allgather(np.array([-1 if failure else data.size], np.int64)
                                                         )).reshape(-1)
    if (sizes < 0).any():
        bad = [int(p) for p in np.flatnonzero(sizes < 0)]
        raise TypeError(f"allgather_json: process(es) {bad} could not serialise their value as JSON"
                        + (f" ({failure})" if failure else ""))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(rows[p, :int(sizes[p])].tobytes().decode()) for p in range(len(sizes))]


def _feed(h: Any, obj: Any) -> None:
    """Adds `obj` to hash `h`: arrays by dtype, shape and bytes; containers item by item, tagged by type, so
    different structures never collide by concatenation. Other objects by type name only (a repr may hold a
    per-process address)."""
    if isinstance(obj, np.ndarray | np.generic):
        a = np.ascontiguousarray(obj)
        h.update(f"a{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(obj, str | bytes | int | float | bool) or obj is None:
        h.update(f"{type(obj).__name__}:{len(repr(obj))}:{obj!r}".encode())
    elif isinstance(obj, Mapping):
        h.update(f"m{len(obj)}".encode())
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
    elif isinstance(obj, list | tuple):
        h.update(f"l{len(obj)}".encode())
        for x in obj:
            _feed(h, x)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _feed(h, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    else:
        h.update(f"o{type(obj).__qualname__}".encode())


def digest(obj: Any) -> str:
    """A content hash of nested lists/tuples/dicts/dataclasses of arrays, strings and numbers: equal on every
    process exactly when each one's copy holds the same values in the same order."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, obj)
    return h.hexdigest()


def check_same_everywhere(what: str, obj: Any, size: int, hint: str = "") -> None:
    """Raises ValueError when the processes of a job hold different `obj`s, compared by `digest` (a collective:
    every process must call it; nothing to check, and nothing hashed, with one process). Each process builds its
    batches from its own copy of the data, so copies that differ (another file version on one host, a host-local
    path) would train on rows that no one process holds, silently. `size`: the number of items, reported per
    process; `hint`: added to the error."""
    if jax.process_count() == 1:
        return
    mine = [digest(obj), int(size)]
    everyone = allgather_json(mine)
    if len({d for d, _ in everyone}) > 1:
        groups: dict[str, list[int]] = {}
        for p, (d, _) in enumerate(everyone):
            groups.setdefault(d, []).append(p)
        parts = "; ".join(f"process(es) {ps}: {everyone[ps[0]][1]} items, digest {d[:12]}" for d, ps in groups.items())
        raise ValueError(f"{what} differs between the processes of this job ({parts}): every process must load the "
                         "same data (the same file contents at the same path on every host)" + hint)


def process_span(n: int) -> tuple[int, int]:
    """This process's contiguous share [lo, hi) of n items split as evenly as possible over the processes
    (process p takes the p-th block; the first n % P blocks are one longer)."""
    p, P = jax.process_index(), jax.process_count()
    base, extra = divmod(n, P)
    lo = p * base + min(p, extra)
    return lo, lo + base + (p < extra)


def offload(tree: Any, memory_kind: str = "pinned_host") -> Any:
    """`tree` moved to host memory with the same shardings (each process keeps only its own shards, so this
    works across processes and DMA-copies back on accelerators): device memory is freed for the policy,
    optimizer state and KV cache. `onload` brings it back."""
    return jax.tree.map(lambda a: jax.device_put(a, a.sharding.with_memory_kind(memory_kind)), tree)


def onload(tree: Any) -> Any:
    """Arrays offloaded with `offload` placed back in their devices' default memory."""
    def back(a: jax.Array) -> jax.Array:
        kind = next(iter(a.sharding.device_set)).default_memory().kind
        return jax.device_put(a, a.sharding.with_memory_kind(kind))

    return jax.tree.map(back, tree)
