"""glmv: an inference and serving engine for the GLM-V vision-language models.

Importing glmv has no side effects: no threads, no torch flags, no network.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
