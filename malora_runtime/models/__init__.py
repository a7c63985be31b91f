"""Base model resolution, loading and caching."""
