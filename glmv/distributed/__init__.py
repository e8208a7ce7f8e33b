"""glmv.distributed."""
