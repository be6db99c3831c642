"""Model sources for mlxd: resolution to local mlx-lm directories and GGUF import."""

from .sources import ModelSourceError, ResolvedModel, resolve_model

__all__ = ["ModelSourceError", "ResolvedModel", "resolve_model"]
