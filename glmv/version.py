"""The version of glmv (one place; `glmv.__version__` re-exports it)."""

__version__ = "0.1.0"
