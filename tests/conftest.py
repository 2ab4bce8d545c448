"""Shared helpers for the suite's own CPU tests."""
from __future__ import annotations

import pytest

from overlap.config import EngineConfig
from overlap.engine import TPEngine


@pytest.fixture(scope="module")
def engine_factory():
    """Build engines that are closed at the end of the module, whatever happens."""
    made = []

    def make(**kw) -> TPEngine:
        kw.setdefault("model", "tiny")
        kw.setdefault("engine_timeout", 120)
        e = TPEngine(EngineConfig(**kw))
        made.append(e)
        return e
    yield make
    for e in made:
        e.close()
