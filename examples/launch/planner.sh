#!/usr/bin/env bash
# SLA planner: one OpenAI frontend + the planner, which starts and stops the workers itself
# (--environment local), keeping TTFT and ITL within the targets (docs/planner.md).
#
#   examples/launch/planner.sh                   # simulated workers (mocker), targets 500 ms / 50 ms
#   TTFT_MS=200 ITL_MS=20 MAX_WORKERS=4 examples/launch/planner.sh
#   WORKER="python -m armature.sglang --model-path DIR" examples/launch/planner.sh
#
# Load it (e.g. `armature bench`) and watch the planner's one line per interval.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
HTTP_PORT="${HTTP_PORT:-8000}"

export DYN_DISCOVERY_BACKEND="${DYN_DISCOVERY_BACKEND:-file}"
export DYN_FILE_KV="${DYN_FILE_KV:-$(mktemp -d -t armature_kv.XXXXXX)}"
WORKER="${WORKER:-$PYTHON -m armature.mocker --model-name SmolLM2-135M-Instruct}"

pids=()
cleanup() {
    # The planner stops the workers it started.
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait
}
trap cleanup EXIT INT TERM

"$PYTHON" -m armature.frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" &
pids+=($!)

"$PYTHON" -m armature.planner \
    --environment local --mode agg \
    --worker-command "$WORKER" \
    --metrics-url "http://127.0.0.1:$HTTP_PORT/metrics" \
    --ttft "${TTFT_MS:-500}" --itl "${ITL_MS:-50}" \
    --min-endpoint "${MIN_WORKERS:-1}" --max-gpu-budget "${MAX_WORKERS:-4}" \
    --log-dir "${LOG_DIR:-$(mktemp -d -t armature_workers.XXXXXX)}" \
    "$@" &
pids+=($!)

wait -n
