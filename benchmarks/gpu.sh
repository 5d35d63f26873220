#!/usr/bin/env bash
# The GPU benchmark in one short run (a lent H100/H200 has ~15 minutes in all; see RESULTS.md).
#   bash benchmarks/gpu.sh [peers]    results (JSON per run, log) land in $OUT or benchmarks/gpu-out
# First checks FlexAttention against SDPA on the GPU (benchmarks/gpu_check.py), then times the
# training step, torch.compile'd as `trainer.compile` does, bf16 autocast:
#   small (136M) and base (371M), packed rows through FlexAttention (--attention flex), and
#   small through SDPA with a [B, T, T] mask (what --attention auto runs on a GPU);
#   `peers`: ours against Hugging Face's Llama (plain causal rows, SDPA's flash kernel).
# Wheels in .whl/ (what the machine lacks, e.g. webdataset) are installed first if present.
set -uo pipefail
out=${OUT:-benchmarks/gpu-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 150 python3 benchmarks/gpu_check.py 2>&1 | tee "$out/check.txt" || { echo "gpu_check failed"; exit 1; }
bench() {  # name, then bench train arguments
  local name=$1; shift
  timeout "${BENCH_TIMEOUT:-150}" python3 -m unimodal.bench train --compile --json "$@" > "$out/$name.json" 2> "$out/$name.err" \
    && python3 -c "import json,sys; from unimodal.bench import table; print(table(json.load(open(sys.argv[1]))))" "$out/$name.json" \
    || { echo "$name failed:"; tail -5 "$out/$name.err"; }
  echo
}
case "${1:-all}" in
  peers)  # ours against HF's Llama (both compiled), at the shapes of the first lease
    bench small-flex-hf --attention flex --preset small --batch-size 16 --seq-len 1024 --peer hf --repeats 10 --warmup 3 --steps 3
    bench base-flex-hf --attention flex --preset base --batch-size 8 --seq-len 2048 --peer hf --repeats 6 --warmup 3 --steps 2 ;;
  *)  # MFU: flex at two batch sizes, and SDPA (with a [B, T, T] mask) on the same packed rows
    bench small-flex-16 --attention flex --preset small --batch-size 16 --seq-len 1024 --repeats 10 --warmup 3 --steps 3
    bench small-flex-32 --attention flex --preset small --batch-size 32 --seq-len 1024 --repeats 8 --warmup 3 --steps 2
    bench base-flex-16 --attention flex --preset base --batch-size 16 --seq-len 2048 --repeats 6 --warmup 3 --steps 2
    bench small-sdpa-32 --preset small --batch-size 32 --seq-len 1024 --attention sdpa --repeats 8 --warmup 3 --steps 2 ;;
esac
