"""Which model family a config describes, and its config object: every stage reads configs through here, then
dispatches on the type once, at its planning step.

- ``ModelConfig`` (``config.py``): the DeepSeek-V3 family (V3, V3.1, V3.2, R1, Kimi-K2, V2);
- ``V4Config`` (``v4/config.py``): DeepSeek-V4 (``deepseek_v4``: Flash, Pro, their -Base);
- DeepSeek-V4.1 (``deepseek_v41``) is recognized and refused with one line: its format (32x32 blocks, Engram
  tables, vision tensors) is not V4's and is not established (docs/format-v4.md section 8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ModelConfig, builtin_config_path, parse_config_file
from .errors import ConfigError, UnsupportedModelError
from .v4.config import MODEL_TYPE as V4_TYPE
from .v4.config import V4Config, is_v4

AnyConfig = ModelConfig | V4Config
V41_TYPES = ("deepseek_v41", "deepseek_v41_text")

__all__ = ["AnyConfig", "config_from_dict", "config_from_file", "is_v4", "load_config"]


def config_from_dict(d: dict[str, Any]) -> AnyConfig:
    """The config object of a HF ``config.json`` dict, by its ``model_type``."""
    mt = d.get("model_type") if isinstance(d, dict) else None
    text = d.get("text_config") if isinstance(d, dict) else None
    if mt in V41_TYPES or (isinstance(text, dict) and text.get("model_type") in V41_TYPES):
        raise UnsupportedModelError(
            f"model_type {mt!r} is DeepSeek-V4.1, a different model from V4 (32x32 blocks, Engram tables, vision "
            "tensors): not supported yet"
        )
    if mt == V4_TYPE:
        return V4Config.from_dict(d)
    return ModelConfig.from_dict(d)


def config_from_file(path: str | Path) -> AnyConfig:
    """The config object of a ``config.json`` file (``ConfigError`` naming the file when it is not one)."""
    return parse_config_file(path, config_from_dict)


def load_config(name_or_path: str | Path) -> AnyConfig:
    """A built-in name (``configs/NAME.json``), a config.json path, or a checkpoint folder holding one."""
    p = Path(name_or_path)
    if p.is_dir():
        if (p / "config.json").is_file():
            return config_from_file(p / "config.json")
        raise ConfigError(f"{p}: folder has no config.json")
    if p.is_file():
        return config_from_file(p)
    return config_from_file(builtin_config_path(str(name_or_path)))
