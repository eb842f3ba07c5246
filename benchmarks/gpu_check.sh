#!/usr/bin/env bash
# The GPU check: the CUDA tests and every GPU benchmark in one command, at most 7 minutes on one H100 with the kill
# grace included, so one device call has time left for a second try. Each step runs on its own, under its own
# limit cut to what is left of the whole, and streams its rows to RESULTS/<step>.txt as they are measured, so a
# failing or slow step loses nothing else. At the end the tables are printed for docs/performance.md.
#
#   bash benchmarks/gpu_check.sh --prepare          # where PyPI is reachable: the wheels the GPU machine lacks
#   bash benchmarks/gpu_check.sh [RESULTS]          # on the GPU machine (RESULTS: default $OUT, else gpu_check/)
#   bash benchmarks/gpu_check.sh --quick [RESULTS]  # the same steps and code with tiny sizes, on a CPU in minutes
#
# The interpreter is ${PYTHON:-python3}. Wheels that --prepare put in benchmarks/wheels/ (git-ignored; carry it to
# the device) are installed with no index into a scratch folder first on PYTHONPATH, for the packages that
# interpreter lacks. --quick leaves out per-block compilation of the training rows (minutes on a CPU; the sampling
# benchmark still compiles), and on a CPU DeepSpeed builds its shared-memory collective op first (about a minute).
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

case "${1:-}" in
    --prepare) exec "$python" benchmarks/gpu_wheels.py prepare ;;
    --quick) quick=1; shift ;;
    *) quick=0 ;;
esac
results="${1:-${OUT:-gpu_check}}"
mkdir -p "$results"
if [ "$quick" = 1 ]; then
    total=580  # seconds for all steps, within 10 minutes on 2 CPU cores
else
    total=400  # with the set-up before and the kill grace after, within 7 minutes
fi
grace=5
started=$SECONDS

run() {  # name, seconds allotted, command...: the command gets the smaller of its allotment and what is left;
    # an argument @BUDGET@ becomes the seconds a benchmark may plan for within that limit (it must end on its own)
    local name=$1 allotted=$2
    shift 2
    local left=$((total - (SECONDS - started) - grace))
    local limit=$((allotted < left ? allotted : left))
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, ${left} s of the check's ${total} s left" | tee "$results/$name.txt"
        return
    fi
    local command=("${@//@BUDGET@/$((limit * 85 / 100 - 5))}")
    echo "== $name: ${command[*]} (limit ${limit} s)"
    local start=$SECONDS
    timeout --signal=INT --kill-after=$grace "$limit" "${command[@]}" 2>&1 | tee "$results/$name.txt"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$results/$name.txt"
    [ "$status" = 0 ] || failed="$failed $name"
}
failed=""

site="${TMPDIR:-/tmp}/avflow-gpu-site"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
    rm -rf "$site"
    "$python" benchmarks/gpu_wheels.py install "$site" | tee "$results/wheels.txt"
    export PYTHONPATH="$site:$PYTHONPATH"
else
    echo "no wheels in benchmarks/wheels/ (run --prepare where PyPI is reachable): only what $python has" \
        | tee "$results/wheels.txt"
fi

{
    date -u +"date: %Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$python" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', \
        torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} | tee "$results/device.txt"

if [ "$quick" = 1 ]; then
    run tests 60 "$python" -m pytest -q -p no:cacheprovider -m cuda tests/model/test_attention.py \
        tests/infer/test_gpu_paths.py tests/train/test_hot_path.py
    run sample 150 "$python" benchmarks/sample.py --quick --budget-s @BUDGET@ --json "$results/sample.json"
    run train_throughput 230 "$python" benchmarks/train_throughput.py --quick --budget-s @BUDGET@
    run render 50 "$python" benchmarks/render.py --quick --json "$results/render.json"
    run stream 60 "$python" benchmarks/stream.py --quick --budget-s @BUDGET@ --json "$results/stream.json"
else
    run tests 60 "$python" -m pytest -q -p no:cacheprovider -m cuda tests/model/test_attention.py \
        tests/infer/test_gpu_paths.py tests/train/test_hot_path.py
    run sample 130 "$python" benchmarks/sample.py --budget-s @BUDGET@ --json "$results/sample.json"
    run train_throughput 100 "$python" benchmarks/train_throughput.py --compile --batch 64 --steps 10 \
        --budget-s @BUDGET@
    run render 35 "$python" benchmarks/render.py --json "$results/render.json"
    run stream 60 "$python" benchmarks/stream.py --budget-s @BUDGET@ --json "$results/stream.json"
fi

echo
echo "== tables for docs/performance.md ($((SECONDS - started)) s in all)"
echo "-- device"
cat "$results/device.txt"
for name in tests sample train_throughput render stream; do
    [ -f "$results/$name.txt" ] || continue
    echo "-- $name"
    grep -E '^\||^(date|torch|device|target|pipeline|model|work|data|decode|raster|render|cpu|NVIDIA).*:|^ +(network|demo|published) |passed|failed|skipped|exit [0-9]+' \
        "$results/$name.txt"
done
if [ -n "$failed" ]; then
    echo "== failed:$failed"
    exit 1
fi
