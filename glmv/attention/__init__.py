"""glmv.attention."""
