"""glmv.parsing."""
