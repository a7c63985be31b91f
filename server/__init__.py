"""The OpenAI-compatible HTTP server."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("malora-serve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
