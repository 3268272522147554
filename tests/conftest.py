"""Root conftest: every module in tests/fixtures/ is a fixture plugin."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = sorted(
    f"fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if p.stem != "__init__"
)
