"""The ``armature`` command.

``armature serve`` is the embedded default: an OpenAI frontend and one worker in one process,
sharing one runtime with in-memory discovery, on SmolLM2 unless ``--model-path`` says otherwise.
The other subcommands run the same modules as ``python -m armature.<name>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

log = logging.getLogger("armature.serve")


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="armature serve",
        description=(
            "Serve an OpenAI-compatible API from one process: frontend + one worker, in-memory "
            "discovery. Every other flag goes to the worker (see `python -m armature.sglang --help`)."
        ),
    )
    p.add_argument("--host", "--http-host", dest="host", default="127.0.0.1", help="HTTP bind host")
    p.add_argument("--port", "--http-port", dest="port", type=int, default=8000, help="HTTP port")
    p.add_argument("--api-key", default=None, help="require this bearer token on /v1 routes")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _worker_argv(rest: list[str]) -> list[str]:
    argv = list(rest)
    if not any(a in ("--model-path", "--model") or a.startswith(("--model-path=", "--model=")) for a in argv):
        from armature.engine.loader import default_model_gguf

        argv = ["--model-path", str(default_model_gguf()), *argv]
        if not any(a.startswith("--served-model-name") for a in argv):
            argv += ["--served-model-name", DEFAULT_MODEL_NAME]
    # One process: the frontend and the worker find each other in memory, nowhere else.
    return [*argv, "--discovery-backend", "mem"]


async def _serve(opts: argparse.Namespace, worker_argv: list[str]) -> int:
    from armature.frontend.args import parse_args as parse_frontend_args
    from armature.frontend.main import build_frontend, http_server
    from armature.runtime.runtime import DistributedRuntime
    from armature.sglang.args import ConfigError
    from armature.sglang.args import parse_args as parse_worker_args
    from armature.sglang.engines import create_engine
    from armature.sglang.main import runtime_settings, start_worker

    started = time.monotonic()
    try:
        worker_cfg = parse_worker_args(worker_argv, prog="armature serve")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fe_argv = ["--http-host", opts.host, "--http-port", str(opts.port), "--log-level", opts.log_level]
    fe_argv += ["--namespace", worker_cfg.endpoint.namespace, "--discovery-backend", "mem"]
    if opts.api_key:
        fe_argv += ["--api-key", opts.api_key]
    fe_args = parse_frontend_args(fe_argv)

    runtime = DistributedRuntime.from_settings(runtime_settings(worker_cfg))
    await runtime.start()
    worker = None
    frontend = None
    try:
        engine = await create_engine(worker_cfg)
        worker = await start_worker(runtime, worker_cfg, engine)
        frontend = build_frontend(runtime, fe_args)
        await frontend.start()
        await frontend.wait_for_model(worker_cfg.server.served_model_name, timeout_s=60.0)
        server = http_server(frontend, fe_args)
        try:
            await server.start()
        except OSError as exc:
            print(f"error: cannot listen on {opts.host}:{opts.port}: {exc}", file=sys.stderr)
            return 1
        scheme = "https" if fe_args.tls_cert_path else "http"
        print(
            f"Armature is serving {worker_cfg.server.served_model_name!r} at "
            f"{scheme}://{opts.host}:{opts.port}/v1 (ready in {time.monotonic() - started:.1f} s)",
            flush=True,
        )
        await server.serve()
        return 0 if server.started else 1
    finally:
        if frontend is not None:
            frontend.draining = True
            await frontend.stop()
        if worker is not None:
            await worker.stop()
        await runtime.shutdown(grace_period_s=0.0)


def serve_main(argv: Sequence[str]) -> int:
    opts, rest = _serve_parser().parse_known_args(list(argv))
    logging.basicConfig(
        level=opts.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from armature.sglang.main import run_async

    return run_async(_serve(opts, _worker_argv(rest)))


def _frontend(argv: Sequence[str]) -> int:
    from armature.frontend.main import main

    return main(argv)


def _worker(argv: Sequence[str]) -> int:
    from armature.sglang.main import main

    return main(argv)


def _mocker(argv: Sequence[str]) -> int:
    from armature.sglang.main import mocker_main

    return mocker_main(list(argv))


def _planner(argv: Sequence[str]) -> int:
    from armature.planner.main import main

    return main(list(argv))


def _bench(argv: Sequence[str]) -> int:
    from armature.bench.cli import main as bench_main

    return bench_main(argv)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "serve": (serve_main, "frontend + one worker in one process (the embedded default)"),
    "frontend": (_frontend, "the OpenAI HTTP frontend (python -m armature.frontend)"),
    "worker": (_worker, "an SGLang-style worker (python -m armature.sglang)"),
    "mocker": (_mocker, "a worker on the simulated engine (python -m armature.mocker)"),
    "planner": (_planner, "scales workers to keep TTFT/ITL within an SLA (python -m armature.planner)"),
    "bench": (_bench, "load generator for any OpenAI endpoint: latency, throughput, goodput (docs/bench.md)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: armature <command> [args...]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"armature: unknown command {name!r}; run `armature --help`", file=sys.stderr)
        return 2
    return COMMANDS[name][0](rest)
