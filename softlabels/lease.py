"""One writer per output: an exclusive lease on a directory, held by a command for as long as it writes.

``generate``, ``seal``, ``select``, ``train-student`` and ``init-student`` hold the lease on their output
(all but ``seal`` through ``claim.claim_output``, which checks the output first); a second writer is
refused before it does any work, with one line naming the holder (command, pid, host, age).

Local disk: ``DIR/_lease.json``, ``flock``-ed on a descriptor kept open for the whole command and
holding the holder's record (JSON). The kernel drops a dead process's lock, so a lease left by a
crash is stale by construction and the next writer takes it over. Every holder keeps a shared lock;
a newcomer first tries for an exclusive lock, which it gets only when nobody holds the file, writes
its record, then shares. A newcomer that cannot get the exclusive lock waits for a shared one and
reads the record: the same job joins, any other is refused. The last holder out (the one whose
exclusive lock succeeds) unlinks the file; an acquirer checks after locking that the path still
names its descriptor's file, so it never holds an unlinked one.

Object stores (no locks, no rename): numbered lease epochs ``DIR/_lease/NNNNNNNN.json``, the live
lease being the highest number while its ``expires_unix`` lies ahead. A holder renews it every
``RENEW_S`` seconds from a daemon thread (expiry ``TTL_S`` after each renewal). To take over an
expired or released epoch N a writer creates N+1 conditionally (If-None-Match), so of several racers
exactly one wins; the winner deletes the older epochs, the others re-read and are refused. The ranks
of one multi-process job each add a member object ``NNNNNNNN.rank-RRRRR.json`` and the last member
out deletes the epoch. Release deletes what the holder wrote; a holder that dies leaves an epoch that
expires ``TTL_S`` after its last renewal.

Ranks of one torchrun job (``distributed.launcher_job``) share the lease; any other holder, another
process of the same host included, is refused.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from .distributed import distributed_env, launcher_job
from .errors import UserError
from .storage import Location, fsspec_filesystem, os_error_reason, store_errors, writing

__all__ = ["LOCAL_NAME", "STORE_DIR", "LEASE_NAMES", "TTL_S", "RENEW_S", "LeaseHeld", "Lease", "is_lease_name",
           "hold_lease", "lease_scope", "take_lease", "describe_holder"]

LOCAL_NAME = "_lease.json"
STORE_DIR = "_lease"
LEASE_NAMES = (LOCAL_NAME, STORE_DIR)
"""The names a lease takes directly inside the directory it guards."""
TTL_S = 60.0
READ_TRIES = 5
"""Reads of a store lease record that does not parse (one cut short by a concurrent renewal) before it is refused."""
"""Seconds an object-store lease lives after its last renewal."""
RENEW_S = 15.0
"""Seconds between renewals of an object-store lease."""
WAIT_S = 5.0
"""How long a local acquirer waits for a holder that is writing its record (microseconds, normally)."""
POLL_S = 0.01
STORE_ATTEMPTS = 16
MARK = '{"softlabels_lease": 1'
MAX_RECORD = 1 << 16
EPOCH_NAME = re.compile(r"(\d{8,})\.json")
MEMBER_NAME = re.compile(r"(\d{8,})\.rank-(\d+)\.json")


class LeaseHeld(UserError):
    """Another writer holds the lease; ``holder`` is its record (None when it could not be read)."""

    def __init__(self, message: str, holder: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.holder = holder


def is_lease_name(name: str) -> bool:
    """Is ``name`` (directly inside a directory) a lease of that directory?"""
    return name in LEASE_NAMES


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size} {unit} {seconds % size // sub_size} {sub}"
    return f"{seconds} s"


def describe_holder(holder: dict[str, Any] | None, now: float | None = None) -> str:
    """``'softlabels generate' (pid 1234 on host h, for 3 min 12 s)`` for a lease record."""
    if holder is None:
        return "another writer (its lease record is unreadable)"
    now = time.time() if now is None else now
    who = f"pid {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("launcher") and int(holder.get("world_size", 1)) > 1:
        who += f", rank {holder.get('rank')} of a {holder.get('world_size')}-rank job"
    started = holder.get("started_unix")
    age = f", for {_duration(now - started)}" if isinstance(started, (int, float)) else ""
    return f"'{holder.get('command')}' ({who}{age})"


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("softlabels_lease") == 1 and "job" in record else None


def _ours(data: bytes) -> bool:
    """Bytes a lease writer could have left, a record torn by a crash included."""
    text = data.decode("utf-8", "replace")
    return text.startswith(MARK) or MARK.startswith(text)


def _machine() -> str | None:
    """This boot of this machine and this pid namespace (Linux), where a pid names one process; else None."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


MACHINE = _machine()


LIVE_JOBS: collections.Counter[str] = collections.Counter()
"""The jobs whose store leases this process holds right now (a lease of this pid not among them was
left by an earlier command of the same process, for instance one the store's outage stopped)."""


def _gone(record: dict[str, Any]) -> bool:
    """Is the holder of ``record`` a process of this machine that is no longer running (or this very
    process, which no longer holds it)?"""
    if MACHINE is None or record.get("machine") != MACHINE or not isinstance(record.get("pid"), int):
        return False
    if record["pid"] == os.getpid():
        return LIVE_JOBS[str(record.get("job"))] <= 0
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _new_record(command: str) -> dict[str, Any]:
    env = distributed_env()
    job = launcher_job()
    host, pid, now = socket.gethostname(), os.getpid(), time.time()
    started = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"softlabels_lease": 1, "command": command, "host": host, "pid": pid,
            "job": job or f"{host}:{pid}:{uuid.uuid4().hex}", "launcher": job is not None,
            "rank": env.rank, "world_size": env.world_size, "started": started, "started_unix": now, "machine": MACHINE}


class Lease:
    """A held lease (see the module docstring); made and released by ``hold_lease``.

    Attributes:
        location: the directory it guards.
        holder: the record of the lease as held: this process's, or the first rank's of its job.
        joined: True when another rank of this job took it first.
        previous: the record of a stale lease this one took over, else None.
    """

    def __init__(self, location: Location, command: str, flag: str | None = "--out") -> None:
        self.location = location
        self.record = _new_record(command)
        self.holder: dict[str, Any] = self.record
        self.joined = False
        self.previous: dict[str, Any] | None = None
        self.named = f"{flag} {location}" if flag else str(location)

    def _held(self, holder: dict[str, Any] | None, note: str = "") -> LeaseHeld:
        return LeaseHeld(f"{self.named} is being written by {describe_holder(holder)}; wait for it to finish, or stop it{note}", holder)

    def _took_over(self) -> None:
        previous = self.previous
        if previous is not None and previous.get("job") != self.record["job"]:
            print(f"warning: {self.named}: took over the lease of {describe_holder(previous)}, which stopped without releasing it",
                  file=sys.stderr)

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


def _flock(fd: int, operation: int) -> bool:
    """Lock without waiting: True when locked, False when another holder's lock conflicts."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class _LocalLease(Lease):
    def acquire(self) -> None:
        root = Path(self.location.path)
        if root.exists() and not root.is_dir():
            raise UserError(f"{self.named} exists and is not a directory")
        self.created = [p for p in (root, *root.parents) if not p.exists()]  # removed again at release while empty
        self.path = root / LOCAL_NAME
        self.locked = True
        deadline = time.monotonic() + WAIT_S
        while True:
            with writing(root, action="create directory"):  # a read-only or full disk: one line naming the folder
                root.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # a holder leaving removed the directory it had created
            except OSError as exc:
                raise UserError(f"{self.named}: cannot write {self.path}: {os_error_reason(exc)}") from None
            try:
                if self._attempt(fd, deadline):
                    self.fd = fd
                    self._took_over()
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _attempt(self, fd: int, deadline: float) -> bool:
        """True once this process shares the lease on ``fd`` with its own job; False to try again."""
        try:
            exclusive = _flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a filesystem without flock: write, but say that nothing is guarded
            print(f"warning: {self.named}: cannot lock {LOCAL_NAME} ({exc.strerror}); a second writer would not be refused",
                  file=sys.stderr)
            os.pwrite(fd, json.dumps(self.record).encode(), 0)
            self.locked = False
            return True
        wrote = exclusive
        if exclusive:  # nobody holds it: a new file, or one a dead holder left
            if not _same_file(fd, self.path):
                return False
            previous = os.pread(fd, MAX_RECORD, 0)
            if previous and not _ours(previous):
                raise UserError(f"{self.named} holds {LOCAL_NAME}, which softlabels did not write; remove it or give another --out")
            self.previous = _parse(previous)
            data = json.dumps(self.record).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)  # other hosts of a network filesystem read it
            fcntl.flock(fd, fcntl.LOCK_SH)  # share it with the job's other ranks
        else:
            while not _flock(fd, fcntl.LOCK_SH):  # the holder is writing its record, or leaving
                if time.monotonic() > deadline:
                    raise self._held(_parse(os.pread(fd, MAX_RECORD, 0)))
                time.sleep(POLL_S)
        if not _same_file(fd, self.path):
            return False  # the last holder unlinked it as we locked it
        holder = _parse(os.pread(fd, MAX_RECORD, 0))
        if holder is None:  # a record torn by a crash: the next exclusive lock takes it over
            if time.monotonic() > deadline:
                raise self._held(None)
            time.sleep(POLL_S)
            return False
        if holder["job"] != self.record["job"]:
            raise self._held(holder)
        self.holder, self.joined = holder, not wrote
        return True

    def release(self) -> None:
        fd = self.fd
        try:
            last = _flock(fd, fcntl.LOCK_EX) if self.locked else True
            if last and _same_file(fd, self.path):  # the last holder out removes it
                os.unlink(self.path)
                for directory in self.created:  # what acquire created, while it stays empty
                    os.rmdir(directory)
        except OSError:
            pass
        finally:
            os.close(fd)


class _StoreLease(Lease):
    def acquire(self) -> None:
        self.folder = self.location / STORE_DIR
        self.member: Location | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        try:
            self._acquire()
        except OSError as exc:
            raise UserError(f"{self.named}: cannot take the lease in {STORE_DIR}/ ({exc})") from None

    def _epoch(self, number: int) -> Location:
        return self.folder / f"{number:08d}.json"

    def _read(self, number: int | str) -> dict[str, Any] | None:
        """The record of epoch ``number`` (or of the object named so); None if it is gone.

        A store read sizes the object first, so a read that meets a renewal can come back cut short:
        an unparsable record is read again, and one that stays unparsable is refused (never taken
        over as if nobody held it).

        Raises:
            UserError: the object is not a softlabels lease record.
        """
        where = self._epoch(number) if isinstance(number, int) else self.folder / number
        for attempt in range(READ_TRIES):
            try:
                record = _parse(where.read_bytes())
            except FileNotFoundError:
                return None
            if record is not None:
                return record
            time.sleep(0.01 * 2**attempt)
        raise UserError(f"{self.named}: {where} is not a softlabels lease record; softlabels never overwrites files it did not write")

    def _abandoned(self, epoch: int, holder: dict[str, Any], names: list[str]) -> bool:
        """Did every holder of the epoch die on this machine (so its lease need not run out)?"""
        if holder.get("job") == self.record["job"]:
            return False
        members = [name for name in names if (m := MEMBER_NAME.fullmatch(name)) and int(m.group(1)) == epoch]
        records = [self._read(name) for name in members] if holder.get("launcher") else [holder]
        return all(record is not None and _gone(record) for record in records) and bool(records)

    def _acquire(self) -> None:
        for _ in range(STORE_ATTEMPTS):
            names = self.folder.listdir()
            top = max(_numbers(names), default=0)
            holder = self._read(top) if f"{top:08d}.json" in names else None
            if holder is not None and time.time() < float(holder.get("expires_unix", 0)) and not self._abandoned(top, holder, names):
                if holder.get("job") != self.record["job"]:
                    left = float(holder["expires_unix"]) - time.time()
                    raise self._held(holder, f" (a writer that stopped without releasing it holds a store lease until it expires, "
                                              f"in {_duration(left + 1)} at most)")
                self.epoch, self.holder, self.joined = top, holder, True
                break
            record = {**self.record, "epoch": top + 1, "ttl_s": TTL_S, "expires_unix": time.time() + TTL_S}
            if self._epoch(top + 1).write_bytes(json.dumps(record).encode(), exclusive=True):
                self.epoch, self.holder, self.previous = top + 1, record, holder
                for name in names:  # the stale epochs and their members
                    if any(m and int(m.group(1)) <= top for m in (EPOCH_NAME.fullmatch(name), MEMBER_NAME.fullmatch(name))):
                        _delete(self.folder / name)
                break
            # another writer created it first: look again, and find it live
        else:
            raise UserError(f"{self.named}: could not take the lease in {STORE_DIR}/: {STORE_ATTEMPTS} tries lost races to other writers")
        if self.record["launcher"]:
            self.member = self.folder / f"{self.epoch:08d}.rank-{self.record['rank']:05d}.json"
            self.member.write_bytes(json.dumps(self.record).encode())
        self._took_over()
        LIVE_JOBS[self.record["job"]] += 1
        self.thread = threading.Thread(target=self._heartbeat, name="softlabels-lease", daemon=True)
        self.thread.start()

    def _heartbeat(self) -> None:
        while not self.stop.wait(RENEW_S):
            try:
                if max(_numbers(self.folder.listdir()), default=0) > self.epoch:
                    print(f"warning: {self.named}: the lease was taken over by another writer (this one stalled past its "
                          f"{TTL_S:g} s expiry)", file=sys.stderr)
                    return
                renewed = {**self.holder, "expires_unix": time.time() + TTL_S}
                self._epoch(self.epoch).write_bytes(json.dumps(renewed).encode())
            except (OSError, UserError):  # StoreError is a UserError: the store is unreachable for now
                continue  # the next renewal tries again

    def release(self) -> None:
        self.stop.set()
        LIVE_JOBS[self.record["job"]] -= 1
        if self.thread is not None:
            self.thread.join(timeout=RENEW_S)
        with contextlib.suppress(OSError, UserError):
            if self.member is not None:
                _delete(self.member)
                prefix = f"{self.epoch:08d}.rank-"
                if any(name.startswith(prefix) for name in self.folder.listdir()):
                    return  # other ranks of the job still write: the last one deletes the epoch
            _delete(self._epoch(self.epoch))


def _numbers(names: list[str]) -> list[int]:
    """The epoch numbers that lease objects named ``names`` belong to."""
    found = (EPOCH_NAME.fullmatch(name) or MEMBER_NAME.fullmatch(name) for name in names)
    return [int(match.group(1)) for match in found if match]


def _delete(location: Location) -> None:
    """Delete an object through fsspec, which (unlike pyarrow) leaves no folder marker behind."""
    store = fsspec_filesystem(location.uri)  # softlabels' own endpoint and retries, not a cached default
    with contextlib.suppress(FileNotFoundError), store_errors(location):
        store.rm_file(location.uri)


@contextlib.contextmanager
def hold_lease(location: "str | os.PathLike[str] | Location", command: str, flag: str | None = "--out") -> Iterator[Lease]:
    """Hold the lease on the directory ``location`` for the ``with`` block; released on every exit path.

    Args:
        command: what the holder does, as others are told (``softlabels generate``).
        flag: how the user named the directory (``--out``), or None for a positional DIR.

    Raises:
        LeaseHeld: another writer holds it (a ``UserError``: one line naming the holder).
        UserError: the directory is a file, cannot be created, or holds a lease file softlabels did not write.
    """
    place = Location.of(location)
    lease: Lease = _LocalLease(place, command, flag) if place.local else _StoreLease(place, command, flag)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


_SCOPE: ContextVar[contextlib.ExitStack | None] = ContextVar("softlabels_lease_scope", default=None)
_F = TypeVar("_F", bound=Callable[..., Any])


def lease_scope(command: _F) -> _F:
    """Decorate a command so that leases it takes with ``take_lease`` are released when it returns or raises."""

    @functools.wraps(command)
    def scoped(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            token = _SCOPE.set(stack)
            try:
                return command(*args, **kwargs)
            finally:
                _SCOPE.reset(token)

    return scoped  # type: ignore[return-value]


def take_lease(location: "str | os.PathLike[str] | Location", command: str, flag: str | None = "--out") -> Lease:
    """``hold_lease`` until the enclosing ``lease_scope`` command ends (see ``hold_lease``)."""
    stack = _SCOPE.get()
    if stack is None:
        raise RuntimeError("take_lease is called only inside a function decorated with lease_scope")
    return stack.enter_context(hold_lease(location, command, flag))
