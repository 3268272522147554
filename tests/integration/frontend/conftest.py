"""Fixtures for the frontend integration tests (helpers live in stack.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from integration.frontend.stack import ServedStack, served_stack


@pytest.fixture
async def stack(tiny_llama_path: Path) -> AsyncIterator[ServedStack]:
    async with served_stack(tiny_llama_path) as s:
        yield s
