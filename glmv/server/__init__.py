"""glmv.server."""
