from .resolve import ModelSourceError, ResolvedModel, resolve_model

__all__ = ["ModelSourceError", "ResolvedModel", "resolve_model"]
