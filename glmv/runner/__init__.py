"""glmv.runner."""
