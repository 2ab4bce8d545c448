"""The fake's `mlc_llm.serve`: EngineConfig and AsyncMLCEngine."""
from .config import EngineConfig
from .engine import AsyncMLCEngine

__all__ = ["AsyncMLCEngine", "EngineConfig"]
