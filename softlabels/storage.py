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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from .errors import UserError
from .faults import kill_point

__all__ = ["sha256_file", "fsync_path", "os_error_reason", "writing", "atomic_write_text", "append_line", "commit_file"]


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
            if os.path.lexists(self.path):  # nothing to remove is no write, even on a read-only disk
                with writing(self.uri, action="remove"):
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
