"""Object stores: which texts name one, their filesystems, whole-object writes, and their faults
as one line naming the URI.

Filesystems come from ``pyarrow.fs`` (S3, GCS, HDFS) or, for what pyarrow lacks (Azure, exclusive
creates), from fsspec; endpoints and credentials come from each store's standard environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). A place is anything with ``local`` and ``uri``
(a ``Location``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow as pa

from ..errors import UserError

__all__ = ["URI_SCHEMES", "is_uri", "StoreError", "store_errors", "describe_store_failure", "store_retries",
           "STORE_RETRIES_ENV", "store_failure", "MULTIPART_BYTES", "object_store_filesystem", "fsspec_filesystem", "put_object"]

URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs", "file", "memory")


def is_uri(text: str) -> bool:
    """Does ``text`` name a store by scheme (``s3://...``), rather than a local path?"""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.lower() in URI_SCHEMES


STORE_RETRIES_ENV = "SOFTLABELS_STORE_RETRIES"
DEFAULT_STORE_RETRIES = 10
"""Retries of one failed store request (5xx, reset, refused) with exponential backoff from 25 ms:
10 ride out about 25 s of outage; ``SOFTLABELS_STORE_RETRIES`` changes it."""
MULTIPART_BYTES = 5 << 20
"""Writes this large may go up in parts (pyarrow's S3 stream sends smaller ones as one PUT)."""
# Words in an error's text that only a store's client writes (pyarrow's S3/GCS/Azure, botocore).
_STORE_MARKERS = ("AWS Error", "curlCode", "google::cloud", "Azure Error", "Could not connect to the endpoint",
                  "Connection was closed", "Connect timeout", "Read timeout")


class StoreError(UserError):
    """An object store failed (unreachable, down, a missing bucket, permission denied): one line
    naming the URI. Committed work is kept; rerun once the store is back."""


def _store_client_errors() -> tuple[type[BaseException], ...]:
    """botocore's exception bases (s3fs lets some through untranslated), when botocore is installed."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - pyarrow alone reaches S3 without botocore
        return ()
    return (BotoCoreError, ClientError)


def describe_store_failure(uri: str, exc: BaseException) -> StoreError:
    """The one-line ``StoreError`` for a failed request on ``uri``: what failed, then the client's words."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if len(detail) > 300:
        detail = detail[:300] + "..."
    lowered = detail.lower()
    rerun = "committed work is kept; rerun the same command when the store is back"
    if isinstance(exc, PermissionError) or "access_denied" in lowered or "accessdenied" in lowered or "forbidden" in lowered:
        what, rerun = "permission denied by the object store", "check the credentials' permissions, then rerun"
    elif "nosuchbucket" in lowered or "no_such_bucket" in lowered or "bucket does not exist" in lowered:
        what, rerun = "the bucket does not exist", "create it, or check the name and the endpoint"
    elif "network_connection" in lowered or "could not connect" in lowered or "couldn't connect" in lowered or "connect timeout" in lowered:
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        what = "cannot reach the object store" + (f" at {endpoint}" if endpoint and uri.lower().startswith("s3://") else "")
    else:
        what = "object store I/O failed"
    return StoreError(f"{uri}: {what}; {rerun} ({detail})")


def store_failure(exc: BaseException, place: Any) -> StoreError | None:
    """A ``StoreError`` when ``exc``, raised reading or writing ``place`` (a ``Location`` or its text), is
    the store failing (not a damaged file): for readers that catch ``OSError`` from pyarrow to call a
    file unreadable."""
    if hasattr(place, "uri"):  # a Location (whose os.fspath refuses a store URI)
        local, uri = place.local, place.uri
    else:
        text = os.fspath(place)
        local, uri = not is_uri(text) or text.startswith("file://"), text.rstrip("/")
    if local or isinstance(exc, UserError):
        return exc if isinstance(exc, StoreError) else None
    if isinstance(exc, _store_client_errors()) or (isinstance(exc, OSError) and any(m in str(exc) for m in _STORE_MARKERS)):
        return describe_store_failure(uri, exc)
    return None


@contextmanager
def store_errors(location: Any, write: bool = False) -> Iterator[None]:
    """Turn a store's ``OSError`` (or botocore error) inside into a one-line ``StoreError`` naming
    the URI. Local disk passes through unchanged, and so does a read's missing object
    (``FileNotFoundError``); a write's means the bucket is gone."""
    if location.local:
        yield
        return
    try:
        yield
    except FileNotFoundError as exc:
        if write:
            raise describe_store_failure(location.uri, exc) from None
        raise
    except (FileExistsError, UserError):
        raise
    except OSError as exc:
        raise describe_store_failure(location.uri, exc) from None
    except Exception as exc:
        if isinstance(exc, _store_client_errors()):
            raise describe_store_failure(location.uri, exc) from None
        raise


def store_retries() -> int:
    """Retries of one failed store request (``SOFTLABELS_STORE_RETRIES``, default 10)."""
    text = os.environ.get(STORE_RETRIES_ENV)
    if text is None:
        return DEFAULT_STORE_RETRIES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(f"{STORE_RETRIES_ENV}={text!r}: give a whole number of retries (0 or more)")
    return value


def object_store_filesystem(uri: str) -> tuple[str, Any]:
    """(path inside the filesystem, pyarrow filesystem) for a store URI; fsspec serves what pyarrow cannot.

    S3 gets retries with backoff (``store_retries``) and delayed opens, so a write smaller than a
    part is one PUT, and a failed one leaves no multipart upload behind.
    """
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        if isinstance(exc, OSError) and uri.lower().startswith("s3://"):
            raise describe_store_failure(uri, exc) from None  # pyarrow serves s3: its error is the store's
        store = fsspec_filesystem(uri)
        return store._strip_protocol(uri).rstrip("/"), pafs.PyFileSystem(pafs.FSSpecHandler(store))
    if isinstance(fs, pafs.S3FileSystem):
        options = fs.__reduce__()[1][0]  # what from_uri resolved (region, endpoint, ...)
        proxy = options.pop("proxy_options", None)
        if proxy and proxy.get("host"):
            options["proxy_options"] = proxy
        fs = pafs.S3FileSystem(**{**options, "allow_delayed_open": True,
                                  "retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=store_retries())})
    return path.rstrip("/"), fs


def fsspec_filesystem(uri: str) -> Any:
    """The fsspec filesystem for a store URI, configured as softlabels' own (endpoint, retries):
    for what pyarrow lacks, such as exclusive creates or deleting an object without leaving a folder marker.

    Raises:
        UserError: fsspec or the store's filesystem is not installed.
    """
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the [s3] extra
        raise UserError(f"{uri}: this store needs fsspec: pip install 'softlabels[s3]'") from None
    protocol = uri.split("://", 1)[0]
    options: dict[str, Any] = {}
    if protocol.lower() in ("s3", "s3a"):
        # the endpoint is part of the instance cache's key, so a changed AWS_ENDPOINT_URL takes effect
        retries = store_retries()
        options = {"endpoint_url": os.environ.get("AWS_ENDPOINT_URL") or None,
                   "config_kwargs": {"retries": {"max_attempts": retries + 1, "mode": "standard"}}}
    try:
        return fsspec.filesystem(protocol, **options)
    except (ImportError, ValueError) as exc:
        raise UserError(f"{uri}: no filesystem for this store ({exc})") from None


def put_object(place: Any, data: bytes, exclusive: bool = False) -> bool:
    """Write ``data`` as the whole object at ``place`` (a store ``Location``); with ``exclusive`` only if
    no object is there yet (returns False, writing nothing, if one is)."""
    if exclusive:
        try:
            with store_errors(place, write=True):
                with fsspec_filesystem(place.uri).open(place.uri, "xb") as handle:
                    handle.write(data)
        except FileExistsError:
            return False
        return True
    try:
        # One write call, all the bytes: pyarrow's S3 stream completes the upload on close even
        # when the ``with`` body raised, so an incremental write would commit a partial object.
        with store_errors(place, write=True), place.fs.open_output_stream(place.path) as handle:
            handle.write(data)
    except BaseException:
        if len(data) >= MULTIPART_BYTES:  # smaller objects are one PUT: nothing is left pending
            _abort_uploads(place)
        raise
    if len(data) >= MULTIPART_BYTES:  # the upload of a process killed while writing this key
        _abort_uploads(place)
    return True


def _abort_uploads(place: Any) -> None:
    """Abort the multipart uploads pending for this key (best effort: the store may be down).

    pyarrow neither completes nor aborts the multipart upload of a failed write; its parts would
    be stored (and billed) until a lifecycle rule removes them. Only softlabels writes its keys,
    one writer each (the lease; ranks own disjoint keys), so any pending upload of a key it has
    just written or failed to write is a leftover.
    """
    if not place.uri.lower().startswith("s3://"):
        return
    try:
        store = fsspec_filesystem(place.uri)
        bucket, key = place.path.split("/", 1)
        listing = store.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        for upload in listing.get("Uploads", []):
            if upload.get("Key") == key:
                store.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
    except Exception:  # noqa: BLE001 - the write's own error is what the user needs to see
        pass
