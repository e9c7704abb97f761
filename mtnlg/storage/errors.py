"""The errors a store's failure is reported as (besides ``FileNotFoundError`` and ``PermissionError``)."""

from __future__ import annotations


class RemoteStorageError(OSError):
    """A request to a remote store failed (other than missing and refused, which raise
    ``FileNotFoundError`` and ``PermissionError``); the message names the URI."""


class BucketNotFoundError(FileNotFoundError):
    """The bucket of a remote URI does not exist; the message names the URI and bucket."""
