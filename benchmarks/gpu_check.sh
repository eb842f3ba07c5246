#!/usr/bin/env bash
# Every GPU benchmark in one command, bounded to about 8 minutes (one device call): sampling rows and the
# text -> wav + motion pipeline, training throughput per strategy (engine loop and `avflow train` itself),
# and rendering when benchmarks/render.py exists. Each benchmark runs on its own with its own time limit and
# streams its rows to RESULTS/<name>.txt as they are measured, so a failing or slow one loses nothing else.
# At the end the tables are printed for docs/performance.md.
#
#   bash benchmarks/gpu_check.sh [RESULTS]      # RESULTS: default $OUT on the device machine, else gpu_check/
set -u
cd "$(dirname "$0")/.."
results="${1:-${OUT:-gpu_check}}"
mkdir -p "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run() {  # name, seconds, command...
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $* (limit ${seconds} s)"
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$seconds" "$@" 2>&1 | tee "$results/$name.txt"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$results/$name.txt"
}

{
    date -u +"date: %Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} | tee "$results/device.txt"

run sample 270 python benchmarks/sample.py --budget-s 240 --json "$results/sample.json"
run train_throughput 170 python benchmarks/train_throughput.py --compile --batch 64 --steps 10
if [ -f benchmarks/render.py ]; then
    run render 60 python benchmarks/render.py --json "$results/render.json"
fi

echo
echo "== tables for docs/performance.md"
echo "-- device"
cat "$results/device.txt"
for name in sample train_throughput render; do
    [ -f "$results/$name.txt" ] || continue
    echo "-- $name"
    grep -E '^\||^(date|torch|device|target|pipeline|model|work):|exit [0-9]+' "$results/$name.txt"
done
