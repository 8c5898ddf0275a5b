"""polykit-cache: a self-hosted build cache server (WSGI, served by waitress)."""

from polykit_client import __version__

__all__ = ["__version__"]
