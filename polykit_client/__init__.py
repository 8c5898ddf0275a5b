"""polykit client: cache keys, artifacts, and the remote cache backend."""

__version__ = "0.1.0"
