"""Typed errors raised while reading, validating, converting or writing adapters.

Every message names the file and, where it applies, the tensor and the expected versus found shape,
so an operator can fix the adapter without reading our code.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """Base class: anything wrong with an adapter on disk or in memory."""


class AdapterNotFoundError(AdapterError):
    """The adapter directory or one of its files does not exist."""


class UnknownAdapterError(AdapterNotFoundError, KeyError):
    """No adapter of that name: not registered, not under a root, unloaded, or not in the engine."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsafeFormatError(AdapterError):
    """A pickle-based file (.bin, .pt, .pth, .ckpt) was offered: we never unpickle."""


class UnsupportedVersionError(AdapterError):
    """The config's format version is not one this runtime reads."""


class AdapterConfigError(AdapterError):
    """The JSON config is malformed or its values are out of range (for example top_k > N)."""


class MissingTensorError(AdapterError):
    """A tensor the config implies is absent from the safetensors file."""


class UnexpectedTensorError(AdapterError):
    """The safetensors file holds a tensor the config does not account for."""


class ShapeMismatchError(AdapterError):
    """A tensor's shape does not fit the config or the base model's module."""


class UnknownModuleError(AdapterError):
    """The adapter targets a module the base model does not have."""


class NonFiniteTensorError(AdapterError):
    """A tensor holds NaN or Inf values."""


class CorruptFileError(AdapterError):
    """The safetensors file cannot be parsed (truncated, wrong header)."""


class UnsafeFileError(AdapterError):
    """A file the loader would open is not a regular file (a FIFO, socket or device), or is a symlink
    that leaves the adapter directory. Refused before anything is opened."""


class FileTooLargeError(AdapterError):
    """A file is larger than the reader's cap."""


class DestinationError(AdapterError):
    """A writer refuses its destination: it exists and is not an adapter directory (or an empty one)."""


class AdapterMemoryError(AdapterError):
    """Host memory for adapters is held by pinned adapters: this one cannot be held now (a 503, not a 400)."""
