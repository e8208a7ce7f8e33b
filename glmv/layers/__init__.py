"""glmv.layers."""
