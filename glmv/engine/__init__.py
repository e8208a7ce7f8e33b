"""glmv.engine: requests, scheduling, the paged KV block manager and the engine loop."""
