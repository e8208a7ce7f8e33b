"""glmv.engine."""
