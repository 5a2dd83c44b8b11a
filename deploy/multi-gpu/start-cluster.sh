#!/usr/bin/env bash
# gmfx on one machine with several GPUs: a Dask scheduler, one worker per GPU (CUDA_VISIBLE_DEVICES=i,
# resource GPU=1), optional CPU workers, then `gmfx run`. Everything started here stops when the script
# exits, whatever the reason.
#
#   deploy/multi-gpu/start-cluster.sh [--cpu-workers N] [--port P] [--log-dir DIR] -- INPUT --out URL [gmfx run options]
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: start-cluster.sh [--cpu-workers N] [--port P] [--log-dir DIR] -- INPUT [gmfx run options]

  --cpu-workers N   CPU-only workers besides the GPU workers (default 0)
  --port P          scheduler port on 127.0.0.1 (default 8786; the dashboard is on 8787)
  --log-dir DIR     scheduler and worker logs (default ./gmfx-cluster-logs)

Arguments after -- go to `gmfx run`; this script adds --scheduler.
USAGE
}

cpu_workers=0
port=8786
log_dir="./gmfx-cluster-logs"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu-workers) cpu_workers="${2:?--cpu-workers needs a number}"; shift 2 ;;
        --port) port="${2:?--port needs a number}"; shift 2 ;;
        --log-dir) log_dir="${2:?--log-dir needs a folder}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "error: unknown option $1 (gmfx options go after --)" >&2; usage >&2; exit 2 ;;
    esac
done
if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi
for arg in "$@"; do
    if [[ "$arg" == --scheduler || "$arg" == --scheduler=* ]]; then
        echo "error: do not pass --scheduler: this script starts its own scheduler" >&2
        exit 2
    fi
done
[[ "$cpu_workers" =~ ^[0-9]+$ ]] || { echo "error: --cpu-workers must be a whole number" >&2; exit 2; }

if command -v nvidia-smi > /dev/null 2>&1; then
    n_gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
else
    n_gpus=0
fi
n_workers=$(( n_gpus + cpu_workers ))
if [[ "$n_workers" -eq 0 ]]; then
    echo "error: no GPU found by nvidia-smi -L and --cpu-workers is 0: nothing would run" >&2
    exit 1
fi

# Share the memory among the worker processes (each would otherwise assume it has all of it).
mem_total_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
worker_memory="$(( mem_total_kib * 8 / 10 / n_workers / 1024 ))MiB"

mkdir -p "$log_dir"
scheduler_address="tcp://127.0.0.1:$port"
pids=()
cleanup() {
    local status=$?
    trap - EXIT
    # Workers first, then the scheduler (the last started process is the first stopped).
    for (( i=${#pids[@]}-1; i>=0; i-- )); do
        kill -TERM "${pids[$i]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP

dask scheduler --host 127.0.0.1 --port "$port" --dashboard-address "127.0.0.1:$((port + 1))" \
    > "$log_dir/scheduler.log" 2>&1 &
pids+=($!)

for (( i=0; i<n_gpus; i++ )); do
    CUDA_VISIBLE_DEVICES="$i" dask worker "$scheduler_address" --name "gpu-$i" --host 127.0.0.1 \
        --nworkers 1 --nthreads 1 --resources GPU=1 --memory-limit "$worker_memory" \
        > "$log_dir/worker-gpu-$i.log" 2>&1 &
    pids+=($!)
done
for (( i=0; i<cpu_workers; i++ )); do
    # CPU workers offer no resource, and see no GPU.
    CUDA_VISIBLE_DEVICES="" dask worker "$scheduler_address" --name "cpu-$i" --host 127.0.0.1 \
        --nworkers 1 --nthreads 1 --memory-limit "$worker_memory" \
        > "$log_dir/worker-cpu-$i.log" 2>&1 &
    pids+=($!)
done

echo "waiting for $n_gpus GPU and $cpu_workers CPU workers at $scheduler_address (logs in $log_dir)"
python - "$scheduler_address" "$n_workers" <<'PY'
import sys
from distributed import Client

address, n = sys.argv[1], int(sys.argv[2])
with Client(address, timeout="60s") as client:
    client.wait_for_workers(n, timeout=300)
PY

gmfx run "$@" --scheduler "$scheduler_address"
