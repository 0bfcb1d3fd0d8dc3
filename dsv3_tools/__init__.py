"""dsv3-tools: move DeepSeek-V3-family checkpoints between formats, streaming, and prove nothing broke."""

__version__ = "0.1.0"
