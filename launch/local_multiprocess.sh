#!/usr/bin/env bash
# N processes of one command on this machine as one multi-process JAX job (what the tests use).
#
#   launch/local_multiprocess.sh N -- python -m jaxrl_llm.train --config configs/sft_tiny.py --workdir runs/mp
#
# Each process gets JAXRL_COORDINATOR=127.0.0.1:<free port>, JAXRL_NUM_PROCESSES=N, JAXRL_PROCESS_ID=i and,
# on the CPU (JAX_PLATFORMS defaults to cpu here), XLA_FLAGS=--xla_force_host_platform_device_count=<D/N>
# where D = JAXRL_LOCAL_DEVICES (default 8): N processes x D/N devices form one mesh of D devices.
# Cross-process CPU collectives use gloo (JAX's default jax_cpu_collectives_implementation).
# Output lines are prefixed "[i] ". If any process fails, the others are stopped (TERM, then KILL after
# JAXRL_KILL_GRACE_S, default 5 s; each process runs in its own session, so its children are stopped too) and the
# exit status is that of the first failure; 0 when all succeed. SIGTERM to this script is passed on to every
# process, which finishes its step, saves a checkpoint and exits (jaxrl_llm.train; KILL after JAXRL_STOP_GRACE_S,
# default 300 s); SIGINT and SIGHUP stop the processes as a failure does; if this script is killed outright, a
# watchdog stops them within a second or so. Needs bash 5.1 or later (wait -n -p).
# JAXRL_INIT_TIMEOUT_S (start-up timeout, default 300 s) and other variables pass through. PYTHONHASHSEED is
# the same for every process (default 0), so set iteration orders agree (reasoning-gym tasks are generated under
# hash seed 0 in any case; with 0 set here, in-process rather than in a child process).
set -u -o pipefail
if (( BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1) )); then
  echo "error: $0 needs bash 5.1 or later (wait -n -p); this is bash $BASH_VERSION" >&2
  exit 2
fi

usage() { echo "usage: $0 N -- command [args...]" >&2; exit 2; }
[[ $# -ge 3 && "$1" =~ ^[1-9][0-9]*$ && "$2" == "--" ]] || usage
N=$1
shift 2
TOTAL=${JAXRL_LOCAL_DEVICES:-8}
if (( TOTAL % N )); then
  echo "error: JAXRL_LOCAL_DEVICES=$TOTAL devices cannot be split evenly between $N processes" >&2
  exit 2
fi
PER=$(( TOTAL / N ))
PY=${PYTHON:-python3}

# A free port P whose neighbour P+1 (the start-up rendezvous) is free too.
PORT=$("$PY" - <<'EOF'
import socket
for _ in range(100):
    with socket.socket() as a:
        a.bind(("127.0.0.1", 0))
        p = a.getsockname()[1]
        if p >= 65535:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        print(p)
        break
EOF
)
[[ -n "$PORT" ]] || { echo "error: no free port pair on 127.0.0.1" >&2; exit 2; }

# Drop any device-count flag from the caller's XLA_FLAGS; ours sets the per-process count.
BASE_XLA=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')

pids=()
stop_all() {
  local sig=$1 p
  for p in "${pids[@]}"; do kill "-$sig" -- "-$p" 2>/dev/null; done
}
alive() {
  local p
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done
  return 1
}
# cleanup SIGNAL GRACE_S: send SIGNAL, wait up to GRACE_S for the processes to end, then KILL what is left
cleanup() {
  stop_all "$1"
  local t=0 grace=$(( $2 * 10 ))
  while alive && (( t < grace )); do sleep 0.1; t=$(( t + 1 )); done
  stop_all KILL
}
KILL_GRACE=${JAXRL_KILL_GRACE_S:-5}
watchdog=""
stop_watchdog() { [[ -n "$watchdog" ]] && kill "$watchdog" 2>/dev/null; }
trap 'cleanup INT "$KILL_GRACE"; stop_watchdog; exit 130' INT
trap 'cleanup TERM "$KILL_GRACE"; stop_watchdog; exit 129' HUP
trap 'cleanup TERM "${JAXRL_STOP_GRACE_S:-300}"; stop_watchdog; exit 143' TERM

for (( i = 0; i < N; i++ )); do
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
  XLA_FLAGS="$BASE_XLA --xla_force_host_platform_device_count=$PER" \
  JAXRL_COORDINATOR=127.0.0.1:$PORT JAXRL_NUM_PROCESSES=$N JAXRL_PROCESS_ID=$i \
  PYTHONUNBUFFERED=1 PYTHONHASHSEED=${PYTHONHASHSEED:-0} \
    setsid "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
done

# A watchdog in a session of its own (a kill of this script's process group spares it): if this script dies
# without cleaning up (SIGKILL), it stops the processes this script started.
# shellcheck disable=SC2016  # the script's $ expand in the watchdog's shell
setsid bash -c '
  parent=$1 grace=$2
  shift 2
  alive() {  # a zombie (killed, not yet reaped) counts as gone
    if [ -r "/proc/$parent/status" ]; then ! grep -q "^State:[[:space:]]*Z" "/proc/$parent/status"
    else kill -0 "$parent" 2>/dev/null; fi
  }
  while alive; do sleep 1; done
  for p in "$@"; do kill -TERM -- "-$p" 2>/dev/null; done
  sleep "$grace"
  for p in "$@"; do kill -KILL -- "-$p" 2>/dev/null; done
' watchdog $$ "$KILL_GRACE" "${pids[@]}" </dev/null >/dev/null 2>&1 &
watchdog=$!

status=0
live=("${pids[@]}")
while (( ${#live[@]} > 0 )); do
  finished=""
  wait -n -p finished "${live[@]}"
  rc=$?
  [[ -z "${finished:-}" ]] && break  # nothing left to wait for
  rest=()
  for p in "${live[@]}"; do [[ "$p" != "$finished" ]] && rest+=("$p"); done
  live=("${rest[@]+"${rest[@]}"}")
  if (( rc != 0 && status == 0 )); then
    status=$rc
    for (( i = 0; i < N; i++ )); do
      [[ "${pids[$i]}" == "$finished" ]] && who=$i
    done
    echo "local_multiprocess: process ${who:-?} exited with status $rc; stopping the others" >&2
    (( ${#live[@]} > 0 )) && cleanup TERM "$KILL_GRACE"
    break
  fi
done
stop_watchdog
wait  # let the output prefixers finish
exit "$status"
