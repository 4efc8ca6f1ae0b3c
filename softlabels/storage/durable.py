"""Durable local writes: a crash leaves the old file or the whole new one, never a part.

Every write softlabels makes to local disk goes through ``atomic_write_bytes`` (or its text form) or
``commit_file``: the bytes land under a temporary name, are fsync'd, then renamed into place and the
directory entry is fsync'd. Journals and ``metrics.jsonl`` are appended with ``append_line``, which
cuts off a line torn by a crash before the next one. ``writing`` turns a refusal of the disk (full,
read-only, permission) into one ``UserError`` naming the file, and removes temporary files on every
exit path.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..faults import kill_point
from .hashing import sha256_file

__all__ = ["fsync_path", "os_error_reason", "writing", "atomic_write_bytes", "atomic_write_text", "append_line", "commit_file"]


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



def atomic_write_bytes(path: Path, data: bytes, exclusive: bool = False, parents: bool = False, shown: str | None = None) -> bool:
    """Replace ``path`` with ``data`` atomically (the temporary name is per process, so ranks writing
    at once never share one).

    Args:
        exclusive: write only if nothing is there yet (``O_EXCL``); returns False, writing nothing, if
            something is. An empty placeholder holds the name until the rename and never outlives a failure.
        parents: create missing parent folders first.
        shown: how an error names the file (default ``path``).

    Raises:
        UserError: the disk is full, read-only or not writable (the temporary file is removed).
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with writing(path if shown is None else shown, tmp):
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        if exclusive:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return False
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            kill_point(f"{path.name}-staged")
            os.replace(tmp, path)
        except BaseException:
            if exclusive:  # the empty placeholder is ours and must not look like a whole file
                path.unlink(missing_ok=True)
            raise
        kill_point(f"{path.name}-renamed")
        fsync_path(path.parent)
    return True


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` as UTF-8.

    Raises:
        UserError: the disk is full, read-only or not writable (the temporary file is removed).
    """
    atomic_write_bytes(path, text.encode("utf-8"))


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

