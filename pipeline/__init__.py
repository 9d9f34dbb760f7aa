"""Shared core: params schema, shard schema, paths, device choice and the `dextra` CLI."""
