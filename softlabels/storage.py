"""Where bytes live: durable local writes, and ``Location`` for local paths and store URIs alike.

A leaf module: it knows nothing about soft labels. Every write softlabels makes to disk goes through
``atomic_write_text`` or ``commit_file``: the bytes land under a temporary name, are fsync'd, then
renamed into place and the directory entry is fsync'd, so a crash leaves either the old file or the
whole new one. Journals and ``metrics.jsonl`` are appended with ``append_line``, which cuts off a line
torn by a crash before the next one. ``writing`` turns a refusal of the disk (full, read-only,
permission) into one ``UserError`` naming the file, and removes temporary files on every exit path.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from .errors import UserError
from .faults import kill_point

__all__ = ["sha256_file", "sha256_named_files", "fsync_path", "os_error_reason", "writing", "atomic_write_text", "append_line", "commit_file"]


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    _hash_bytes_of(path, digest, chunk_bytes)
    return digest.hexdigest()


def sha256_named_files(files: "list[Path]") -> str:
    """Hex sha256 over each file's name and then its bytes, in the given order: the identity of a model
    or tokenizer that is several files."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        _hash_bytes_of(file, digest)
    return digest.hexdigest()


def _hash_bytes_of(path: Path, digest: "hashlib._Hash", chunk_bytes: int = 1 << 20) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)


def fsync_path(path: Path) -> None:
    """fsync a file's bytes, or a directory's entries (what makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error_reason(exc: OSError) -> str:
    """The cause of an I/O error in words: "no space left on device", "read-only file system", ..."""
    text = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc) or type(exc).__name__)
    text = " ".join(text.split())  # one line, whatever the library wrote
    return text[:1].lower() + text[1:]


@contextmanager
def writing(path: "str | os.PathLike[str]", *partial: Path, action: str = "write") -> Iterator[None]:
    """The one place local write errors become one line: an ``OSError`` inside raises
    ``UserError("cannot write PATH: no space left on device")``, and on any exception (Ctrl-C too)
    the ``partial`` files are removed, so nothing half-written stays behind."""
    try:
        yield
    except BaseException as exc:
        for leftover in partial:
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass  # the directory itself is unwritable: the temporary name still says it is partial
        if isinstance(exc, OSError):
            failed = exc.filename if action == "create directory" and exc.filename else path  # the first folder refused
            raise UserError(f"cannot {action} {os.fspath(failed)}: {os_error_reason(exc)}") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (the temporary name is per process).

    Raises:
        UserError: the disk is full, read-only or not writable (the temporary file is removed).
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks sealing at once never share a tmp
    with writing(path, tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        kill_point(f"{path.name}-staged")
        os.replace(tmp, path)
        kill_point(f"{path.name}-renamed")
        fsync_path(path.parent)


def append_line(path: Path, line: str, durable: bool = True) -> None:
    """Append ``line`` (one JSON record, no newline) and a newline to ``path``, fsync'd when ``durable``.

    A crash mid-append leaves a torn last line with no newline. It is cut off first, so it can never
    swallow the new record (a JSON object is not valid until its last byte, so readers drop it); a
    tail that parses whole, missing only its newline, is kept. A write that fails is cut off too.

    Raises:
        UserError: the disk is full, read-only or not writable.
    """
    data = (line + "\n").encode()
    with writing(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            whole = _end_of_last_line(fd, end)
            if whole < end:
                if _parses_whole(os.pread(fd, end - whole, whole)):
                    data = b"\n" + data
                else:
                    os.ftruncate(fd, whole)
                    end = whole
            kill_point(f"{path.name}-torn", lambda: (_write_at(fd, data[: len(data) // 2], end), os.fsync(fd)))
            _write_at(fd, data, end)
            if durable:
                os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, end)  # no part of this line stays
            except OSError:
                pass
            raise
        finally:
            os.close(fd)
        kill_point(f"{path.name}-appended")


def _end_of_last_line(fd: int, end: int, block: int = 1 << 16) -> int:
    """The offset just past the file's last newline (0 when it has none)."""
    stop = end
    while stop > 0:
        start = max(0, stop - block)
        found = os.pread(fd, stop - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        stop = start
    return 0


def _parses_whole(tail: bytes) -> bool:
    try:
        return isinstance(json.loads(tail), dict)
    except ValueError:
        return False


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def commit_file(staged: Path, target: Path) -> tuple[int, str]:
    """fsync ``staged``, hash it and rename it to ``target``; returns (bytes, sha256) of the file.

    Raises:
        UserError: the disk refused (``staged`` is removed).
    """
    with writing(target, staged):
        fsync_path(staged)
        digest = sha256_file(staged)
        size = staged.stat().st_size
        kill_point(f"{target.name}-staged")
        os.replace(staged, target)
        kill_point(f"{target.name}-renamed")
        fsync_path(target.parent)
    return size, digest


# -- locations: a local directory or a prefix in an object store ----------------------------------

URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs", "file", "memory")


def is_uri(text: str) -> bool:
    """Does ``text`` name a store by scheme (``s3://...``), rather than a local path?"""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.lower() in URI_SCHEMES


@dataclass(frozen=True)
class Location:
    """A file or directory on local disk or in an object store, as one value.

    Local paths keep the local-disk guarantees (fsync, atomic rename); object stores get whole-object
    writes, never an append or a rename. Filesystems come from ``pyarrow.fs`` (S3, GCS, HDFS) or,
    for what pyarrow lacks (Azure, exclusive creates), from fsspec; endpoints and credentials come
    from each store's standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).

    Attributes:
        uri: how the user named it (or the child's name joined to it): used in messages.
        path: the path inside ``fs`` (a local path, or ``bucket/key`` without a scheme).
        fs: the pyarrow filesystem; None for local disk.
    """

    uri: str
    path: str
    fs: Any = None

    @classmethod
    def of(cls, place: "str | os.PathLike[str] | Location") -> "Location":
        if isinstance(place, Location):
            return place
        text = os.fspath(place)
        if not is_uri(text) or text.startswith("file://"):
            local = text[len("file://"):] if text.startswith("file://") else text
            return cls(text, local, None)
        return cls(text.rstrip("/"), *_object_store(text))

    @property
    def local(self) -> bool:
        return self.fs is None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """Local paths work wherever a path does (``open``, pyarrow); a store URI is not a path."""
        if not self.local:
            raise TypeError(f"{self.uri} is in an object store, not a local path")
        return self.path

    def __truediv__(self, name: str) -> "Location":
        if self.local:
            return Location(os.path.join(self.uri, name), os.path.join(self.path, name))
        return Location(f"{self.uri.rstrip('/')}/{name}", f"{self.path.rstrip('/')}/{name}", self.fs)

    @property
    def parent(self) -> "Location":
        """The folder that holds this place, on the same disk or store."""
        if self.local:
            return Location(os.path.dirname(self.uri) or ".", os.path.dirname(self.path) or ".")
        return Location(self.uri.rstrip("/").rsplit("/", 1)[0], self.path.rstrip("/").rsplit("/", 1)[0], self.fs)

    def same_as(self, other: "str | os.PathLike[str] | Location") -> bool:
        """Do the two name the same place? (local paths after resolving links, store URIs as written)"""
        other = Location.of(other)
        if self.local and other.local:
            return Path(self.path).resolve() == Path(other.path).resolve()
        return self.uri.rstrip("/") == other.uri.rstrip("/")

    @property
    def local_path(self) -> Path:
        if not self.local:
            raise ValueError(f"{self.uri} is not on local disk")
        return Path(self.path)

    # -- what is there --------------------------------------------------------------------------
    def _info(self) -> Any:
        with store_errors(self):
            return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        if self.local:
            return os.path.exists(self.path)
        return self._info().type != _FILE_TYPE().NotFound or self.is_dir()

    def is_file(self) -> bool:
        if self.local:
            return os.path.isfile(self.path)
        return self._info().type == _FILE_TYPE().File

    def is_dir(self) -> bool:
        """A local directory, or an object-store prefix that holds at least one object."""
        if self.local:
            return os.path.isdir(self.path)
        info = self._info()
        if info.type == _FILE_TYPE().Directory:
            return True
        if info.type == _FILE_TYPE().File:
            return False
        return bool(self.listdir())

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind("."):] if "." in name else ""

    def walk(self) -> list["Location"]:
        """Every file below this directory, recursively, in path order."""
        if self.local:
            found = [os.path.join(top, name) for top, _, names in os.walk(self.path) for name in names]
            return [Location(os.path.join(self.uri, os.path.relpath(p, self.path)), p) for p in sorted(found)]
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        with store_errors(self):
            found = self.fs.get_file_info(selector)
        infos = sorted((i for i in found if i.type == pafs.FileType.File), key=lambda i: i.path)
        return [Location(f"{self.uri.rstrip('/')}/{i.path[len(self.path):].lstrip('/')}", i.path, self.fs) for i in infos]

    def size(self) -> int:
        return os.path.getsize(self.path) if self.local else int(self._info().size)

    def listdir(self) -> list[str]:
        """Names directly inside this directory (an empty list when there is none), sorted."""
        if self.local:
            return sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        with store_errors(self):
            return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def sizes(self) -> dict[str, int]:
        """Name -> size of the files directly inside this directory, from one listing."""
        if self.local:
            if not os.path.isdir(self.path):
                return {}
            with os.scandir(self.path) as entries:
                return {e.name: e.stat().st_size for e in entries if e.is_file()}
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        with store_errors(self):
            return {i.base_name: int(i.size) for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File}

    # -- reading ------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        if self.local:
            return Path(self.path).read_bytes()
        attempt = 0
        while True:
            try:
                with store_errors(self), self.fs.open_input_stream(self.path) as handle:
                    return handle.read()
            except StoreError as exc:
                # The AWS SDK does not retry an error answer longer than the object it reads (a
                # 503's XML for a small journal record): "Failed to flush response stream". We do.
                if "Failed to flush response stream" not in str(exc) or attempt >= store_retries():
                    raise
                time.sleep(0.025 * 2**attempt)
                attempt += 1

    def read_head(self, count: int) -> bytes:
        """The first ``count`` bytes (fewer if the file is shorter)."""
        with store_errors(self), self.open() as handle:
            return handle.read(count)

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the file."""
        with store_errors(self), self.open() as handle:
            handle.seek(start)
            return handle.read(stop - start)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open(self) -> Any:
        """A seekable binary file for readers such as ``pyarrow.parquet.ParquetFile``.

        On an object store, errors of the reads made through it are ``OSError``s: ``store_failure``
        tells a failing store from a damaged file.
        """
        if self.local:
            return pa.OSFile(self.path, "r")  # native, no GIL
        with store_errors(self):
            return self.fs.open_input_file(self.path)

    def sha256(self) -> str:
        if self.local:
            return sha256_file(Path(self.path))
        digest = hashlib.sha256()
        with store_errors(self), self.fs.open_input_stream(self.path) as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    # -- writing ------------------------------------------------------------------------------
    def mkdir(self) -> None:
        """Create the directory (local disk); object stores have no directories to create.

        Raises:
            UserError: local disk refused (read-only, permission denied, a file in the way).
        """
        if self.local:
            with writing(self.uri, action="create directory"):
                os.makedirs(self.path, exist_ok=True)

    def write_bytes(self, data: bytes, exclusive: bool = False) -> bool:
        """Replace this file with ``data`` whole: local disk stages, fsyncs and renames; an object
        store gets one whole-object write.

        Args:
            exclusive: write only if nothing is there yet (an object store's conditional create,
                ``O_EXCL`` on local disk); returns False, writing nothing, if something is.
        """
        if self.local:  # a refusal of the disk is one UserError naming the file; no temporary file stays
            target = Path(self.path)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            with writing(self.uri, tmp):
                target.parent.mkdir(parents=True, exist_ok=True)
                if exclusive:
                    try:
                        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                    except FileExistsError:
                        return False
                    os.close(fd)
                try:
                    with open(tmp, "wb") as handle:
                        handle.write(data)
                        handle.flush()
                        os.fsync(handle.fileno())
                    kill_point(f"{target.name}-staged")
                    os.replace(tmp, target)
                except BaseException:
                    if exclusive:  # the empty placeholder is ours and must not look like a whole file
                        target.unlink(missing_ok=True)
                    raise
                kill_point(f"{target.name}-renamed")
                fsync_path(target.parent)
            return True
        if exclusive:
            try:
                with store_errors(self, write=True):
                    with _fsspec_store(self.uri).open(self.uri, "xb") as handle:
                        handle.write(data)
            except FileExistsError:
                return False
            return True
        try:
            # One write call, all the bytes: pyarrow's S3 stream completes the upload on close even
            # when the ``with`` body raised, so an incremental write would commit a partial object.
            with store_errors(self, write=True), self.fs.open_output_stream(self.path) as handle:
                handle.write(data)
        except BaseException:
            if len(data) >= MULTIPART_BYTES:  # smaller objects are one PUT: nothing is left pending
                self._abort_uploads()
            raise
        if len(data) >= MULTIPART_BYTES:  # the upload of a process killed while writing this key
            self._abort_uploads()
        return True

    def _abort_uploads(self) -> None:
        """Abort the multipart uploads pending for this key (best effort: the store may be down).

        pyarrow neither completes nor aborts the multipart upload of a failed write; its parts would
        be stored (and billed) until a lifecycle rule removes them. Only softlabels writes its keys,
        one writer each (the lease; ranks own disjoint keys), so any pending upload of a key it has
        just written or failed to write is a leftover.
        """
        if not self.uri.lower().startswith("s3://"):
            return
        try:
            store = _fsspec_store(self.uri)
            bucket, key = self.path.split("/", 1)
            listing = store.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
            for upload in listing.get("Uploads", []):
                if upload.get("Key") == key:
                    store.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
        except Exception:  # noqa: BLE001 - the write's own error is what the user needs to see
            pass

    def delete(self) -> None:
        """Remove this file if it is there."""
        if self.local:
            if os.path.lexists(self.path):  # nothing to remove is no write, even on a read-only disk
                with writing(self.uri, action="remove"):
                    Path(self.path).unlink(missing_ok=True)
            return
        if self.is_file():
            with store_errors(self):
                self.fs.delete_file(self.path)

    def require_bucket(self, flag: str = "") -> None:
        """Refuse, before any work, a store location whose bucket is missing or cannot be reached.

        Raises:
            UserError: naming ``flag``, the URI and the bucket (no-op on local disk).
        """
        if self.local:
            return
        bucket = self.path.split("/", 1)[0]
        with store_errors(self):
            info = self.fs.get_file_info(bucket)
        if info.type == _FILE_TYPE().NotFound:
            named = f"{flag} {self.uri}" if flag else self.uri
            raise StoreError(f"{named}: bucket {bucket!r} does not exist (create it, or check the name and AWS_ENDPOINT_URL)")


def _FILE_TYPE() -> Any:
    import pyarrow.fs as pafs

    return pafs.FileType


# -- object-store faults: one line naming the URI -------------------------------------------------

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


def store_failure(exc: BaseException, place: "Location | str") -> StoreError | None:
    """A ``StoreError`` when ``exc``, raised reading or writing ``place``, is the store failing (not a
    damaged file): for readers that catch ``OSError`` from pyarrow to call a file unreadable."""
    location = Location.of(place)
    if location.local or isinstance(exc, UserError):
        return exc if isinstance(exc, StoreError) else None
    if isinstance(exc, _store_client_errors()) or (isinstance(exc, OSError) and any(m in str(exc) for m in _STORE_MARKERS)):
        return describe_store_failure(location.uri, exc)
    return None


@contextmanager
def store_errors(location: "Location", write: bool = False) -> Iterator[None]:
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


def _object_store(uri: str) -> tuple[str, Any]:
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
        store = _fsspec_store(uri)
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
    for what pyarrow lacks, such as deleting an object without leaving a folder marker."""
    return _fsspec_store(uri)


def _fsspec_store(uri: str) -> Any:
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


__all__ += ["URI_SCHEMES", "is_uri", "Location", "StoreError", "store_errors", "store_failure", "describe_store_failure",
            "store_retries", "STORE_RETRIES_ENV", "fsspec_filesystem"]
