"""Where bytes live: durable local writes, and ``Location`` for local paths and store URIs alike.

A leaf module: it knows nothing about soft labels. Every write softlabels makes to disk goes through
``atomic_write_text`` or ``commit_file``: the bytes land under a temporary name, are fsync'd, then
renamed into place and the directory entry is fsync'd, so a crash leaves either the old file or the
whole new one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from .errors import UserError

__all__ = ["sha256_file", "fsync_path", "atomic_write_text", "commit_file"]


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file's bytes, or a directory's entries (what makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (the temporary name is per process)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks sealing at once never share a tmp
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def commit_file(staged: Path, target: Path) -> tuple[int, str]:
    """fsync ``staged``, hash it and rename it to ``target``; returns (bytes, sha256) of the file."""
    fsync_path(staged)
    digest = sha256_file(staged)
    size = staged.stat().st_size
    os.replace(staged, target)
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
        infos = sorted((i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File), key=lambda i: i.path)
        return [Location(f"{self.uri.rstrip('/')}/{i.path[len(self.path):].lstrip('/')}", i.path, self.fs) for i in infos]

    def size(self) -> int:
        return os.path.getsize(self.path) if self.local else int(self._info().size)

    def listdir(self) -> list[str]:
        """Names directly inside this directory (an empty list when there is none), sorted."""
        if self.local:
            return sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
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
        return {i.base_name: int(i.size) for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File}

    # -- reading ------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        if self.local:
            return Path(self.path).read_bytes()
        with self.fs.open_input_stream(self.path) as handle:
            return handle.read()

    def read_head(self, count: int) -> bytes:
        """The first ``count`` bytes (fewer if the file is shorter)."""
        with self.open() as handle:
            return handle.read(count)

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the file."""
        with self.open() as handle:
            handle.seek(start)
            return handle.read(stop - start)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open(self) -> Any:
        """A seekable binary file for readers such as ``pyarrow.parquet.ParquetFile``."""
        return pa.OSFile(self.path, "r") if self.local else self.fs.open_input_file(self.path)  # native, no GIL

    def sha256(self) -> str:
        if self.local:
            return sha256_file(Path(self.path))
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.path) as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    # -- writing ------------------------------------------------------------------------------
    def mkdir(self) -> None:
        """Create the directory (local disk); object stores have no directories to create."""
        if self.local:
            os.makedirs(self.path, exist_ok=True)

    def write_bytes(self, data: bytes, exclusive: bool = False) -> bool:
        """Replace this file with ``data`` whole: local disk stages, fsyncs and renames; an object
        store gets one whole-object write.

        Args:
            exclusive: write only if nothing is there yet (an object store's conditional create,
                ``O_EXCL`` on local disk); returns False, writing nothing, if something is.
        """
        if self.local:
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            if exclusive:
                try:
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                except FileExistsError:
                    return False
                os.close(fd)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
            fsync_path(target.parent)
            return True
        if exclusive:
            try:
                with _fsspec_store(self.uri).open(self.uri, "xb") as handle:
                    handle.write(data)
            except FileExistsError:
                return False
            return True
        with self.fs.open_output_stream(self.path) as handle:
            handle.write(data)
        return True

    def delete(self) -> None:
        """Remove this file if it is there."""
        if self.local:
            Path(self.path).unlink(missing_ok=True)
            return
        if self.is_file():
            self.fs.delete_file(self.path)


def _FILE_TYPE() -> Any:
    import pyarrow.fs as pafs

    return pafs.FileType


def _object_store(uri: str) -> tuple[str, Any]:
    """(path inside the filesystem, pyarrow filesystem) for a store URI; fsspec serves what pyarrow cannot."""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        return path.rstrip("/"), fs
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError):
        store = _fsspec_store(uri)
        return store._strip_protocol(uri).rstrip("/"), pafs.PyFileSystem(pafs.FSSpecHandler(store))


def _fsspec_store(uri: str) -> Any:
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the [s3] extra
        raise UserError(f"{uri}: this store needs fsspec: pip install 'softlabels[s3]'") from None
    try:
        return fsspec.filesystem(uri.split("://", 1)[0])
    except (ImportError, ValueError) as exc:
        raise UserError(f"{uri}: no filesystem for this store ({exc})") from None


__all__ += ["URI_SCHEMES", "is_uri", "Location"]
