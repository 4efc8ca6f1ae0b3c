"""Where bytes live: durable local writes, and ``Location`` for local paths and store URIs alike.

A leaf layer: it knows nothing about soft labels.

* ``hashing``: sha256 of a file, or of several named files (a model, a tokenizer).
* ``durable``: atomic local writes (staged, fsync'd, renamed), appends that survive a torn line, and
  ``writing``, which turns a refusal of the disk into one ``UserError`` naming the file.
* ``stores``: object stores: which texts name one, their filesystems, whole-object writes, and a
  store's failure as one ``StoreError`` naming the URI.
* ``location``: ``Location``, one value for a local path or a store URI, with the reads and writes
  every command uses.
"""

from __future__ import annotations

from .durable import append_line, atomic_write_bytes, atomic_write_text, commit_file, fsync_path, os_error_reason, writing
from .hashing import sha256_file, sha256_named_files
from .location import Location
from .stores import (STORE_RETRIES_ENV, URI_SCHEMES, StoreError, describe_store_failure, fsspec_filesystem, is_uri,
                     store_errors, store_failure, store_retries)

__all__ = ["sha256_file", "sha256_named_files", "fsync_path", "os_error_reason", "writing", "atomic_write_bytes",
           "atomic_write_text", "append_line", "commit_file", "URI_SCHEMES", "is_uri", "Location", "StoreError",
           "store_errors", "store_failure", "describe_store_failure", "store_retries", "STORE_RETRIES_ENV",
           "fsspec_filesystem"]
