"""API keys, their limits and the usage they are accounted."""
