"""glmv.models."""
