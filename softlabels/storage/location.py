"""``Location``: a file or directory on local disk or in an object store, as one value."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from .durable import atomic_write_bytes, writing
from .hashing import sha256_file
from .stores import StoreError, is_uri, object_store_filesystem, put_object, store_errors, store_retries

__all__ = ["Location"]


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
        return cls(text.rstrip("/"), *object_store_filesystem(text))

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
        """Replace this file with ``data`` whole: local disk stages, fsyncs and renames
        (``atomic_write_bytes``); an object store gets one whole-object write (``put_object``).

        Args:
            exclusive: write only if nothing is there yet (an object store's conditional create,
                ``O_EXCL`` on local disk); returns False, writing nothing, if something is.
        """
        if self.local:  # a refusal of the disk is one UserError naming the file; no temporary file stays
            return atomic_write_bytes(Path(self.path), data, exclusive=exclusive, parents=True, shown=self.uri)
        return put_object(self, data, exclusive)

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

