#!/usr/bin/env bash
# The GPU figures of the sampler and training-step benchmarks, in one prepared run:
#   1. sampler.py, bf16: SmolLM2-135M and a Llama-3.2-1B-shaped model at batch 1, 8 and 64, HF generate on CUDA in
#      the same run; the decode step against the HBM roofline (bytes of weights + KV cache / copy bandwidth).
#   1b. decode_bytes.py (compile only): the bytes one decode step of the 1B shape moves at batch 64 (bf16 and fp32
#      parameters, bf16 compute), read off XLA:GPU's compiled loop, against the minimum, with its dearest
#      instructions: whether the layer scan reads its weight and cache slices in place.
#   2. train_step.py, SFT, bf16 compute with fp32 master weights: MFU of the jitted step (random rows, every
#      token in the loss) for both models.
#   3. forward.py, bf16: MFU of the forward pass beside torch's.
#   4. filter.py: the top-k/top-p filter of a decode step at [64, 128256]: lax.top_k candidates, bisection, a sort
#      and HF's warpers on CUDA (which path `strategies.filter_threshold` should take on a GPU).
# Each part runs under its own time limit and writes its table and JSON to OUT_DIR, so a part that runs out of
# time still leaves the others' figures.
#
#   bash benchmarks/gpu_report.sh [OUT_DIR]        # about 9 minutes on one H100/H200 (default OUT_DIR /tmp/gpu_report)
#   SMOKE=1 bash benchmarks/gpu_report.sh /tmp/x   # the same commands at toy sizes, on any machine (checks the script)
#
# Needs the package's dependencies (jax with CUDA, flax, optax, transformers, torch, ml_collections). Without
# network access, install ml_collections from a wheel first: WHEELS=DIR installs every DIR/*.whl into a scratch
# folder put on PYTHONPATH.
set -uo pipefail
out=${1:-/tmp/gpu_report}
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_report_site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_report_site"
fi

# part NAME LIMIT_S COMMAND...: run it, keep its output in OUT_DIR/NAME.txt, note a failure and go on
status=0
part() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee "$out/$name.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    echo "== $name: exit status $rc$([ "$rc" = 124 ] && echo " (over its ${limit} s limit)")" | tee -a "$out/$name.txt"
    status=1
  fi
}

$py -c 'import jax; print("jax", jax.__version__, jax.default_backend(), jax.devices())' 2>&1 | tee "$out/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv 2>&1 | tee -a "$out/env.txt"

if [ -n "${SMOKE:-}" ]; then
  part sampler 600 $py benchmarks/sampler.py --models tiny --batch-sizes 1,4 --prompt-len 16 --new-tokens 8 \
    --repeats 1 --dtype bfloat16 --json "$out/sampler.json"
  part decode_bytes 600 $py benchmarks/decode_bytes.py --models tiny --batch-sizes 1,4 --prompt-len 16 --new-tokens 8 \
    --param-dtype bfloat16,float32 --top 5
  part train_step 600 $py benchmarks/train_step.py --tiny --algo sft --no-trl --steps 1 --compute-dtype bfloat16 \
    --peak-flops 1e12 --json "$out/train_step.json"
  part forward 600 $py benchmarks/forward.py --batches 1 --lengths 32 --repeats 1 --dtype bfloat16 \
    --json "$out/forward.json"
  part filter 600 $py benchmarks/filter.py --shapes 2x512 --repeats 1 --json "$out/filter.json"
else
  part sampler 300 $py benchmarks/sampler.py --models smollm2,llama1b --batch-sizes 1,8,64 --prompt-len 128 \
    --new-tokens 256 --repeats 3 --dtype bfloat16 --json "$out/sampler.json"
  part decode_bytes 90 $py benchmarks/decode_bytes.py --models llama1b --batch-sizes 64 --prompt-len 128 \
    --new-tokens 256 --param-dtype bfloat16,float32 --top 12
  part train_step_llama1b 150 $py benchmarks/train_step.py --model llama1b --algo sft --no-trl --batch 8 \
    --length 2048 --steps 5 --compute-dtype bfloat16 --json "$out/train_step_llama1b.json"
  part train_step_smollm2 100 $py benchmarks/train_step.py --model smollm2 --algo sft --no-trl --batch 16 \
    --length 2048 --steps 5 --compute-dtype bfloat16 --json "$out/train_step_smollm2.json"
  part forward 90 $py benchmarks/forward.py --batches 8,32 --lengths 1024 --repeats 5 --dtype bfloat16 \
    --json "$out/forward.json"
  part filter 60 $py benchmarks/filter.py --shapes 1x128256,64x128256 --repeats 10 --json "$out/filter.json"
fi
exit $status
