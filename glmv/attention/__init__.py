"""Attention metadata and backends (paged KV cache over flattened tokens)."""
