"""``softlabels generate --engine ray``: teacher forward passes on a pool of Ray actors.

Only the expensive part moves. Each actor loads the teacher(s) once, from the same SPECs, on its own
device, and runs the local engine's own ``process_unit`` on whole units (same batch size, same
precision, same code), so a unit's numbers do not depend on the engine. Everything else stays in
the driver, exactly as in the local engine: a reader thread reads units from the corpus, and a
writer thread builds, writes, fsyncs, renames and journals each shard (``commit_unit``). The commit
protocol, the journal, resume and sealing are therefore shared, and a run started with one engine
and resumed with the other gives the same directory. The engine is not part of the run fingerprint.
CPU actors run torch with the driver's thread count, because CPU kernels may round differently with
another one (a GRU does); with it, shards are bitwise identical to the local engine's. Several CPU
actors on one machine therefore only oversubscribe it: the default is one actor, or one per GPU.

The trade-off: Ray costs a few seconds to start (a local instance, when no ``--ray-address`` is
given) and a copy of every unit's rows into the object store; the results come back as plain numpy
arrays (no per-position Python objects, no Ray tensor extension types), and the rows themselves never
travel back: actors return only a keep-mask when ``--on-nonfinite skip`` dropped rows. It pays off
when teachers are spread over several GPUs or nodes of an existing cluster; on one machine the local
engine (or ``torchrun``) is as fast and has no extra dependency. On a cluster, the teacher SPECs
(weights files, factory modules) must resolve at the same paths on every node; actors check that
their teachers hash to the driver's, and only the driver touches ``--out``.

Memory is bounded as in the local engine: at most ``UNITS_PER_ACTOR`` units per actor are in flight,
one more is being read and one is being written.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import socket
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .corpus import Unit
from .errors import UserError
from .generate import commit_unit, process_unit, GenerationRun
from .rundir import Journal
from .shards import ShardPayload
from .teachers import load_teacher, resolve_device

__all__ = ["ACTOR_CPUS", "UNITS_PER_ACTOR", "TeacherWorker", "check_address", "run_units_on_ray"]

ACTOR_CPUS = 0.5
"""CPUs each actor reserves: fractional, so one actor never starves a 2-CPU machine's driver and tasks."""

UNITS_PER_ACTOR = 2
"""Units queued per actor: one running, one shipped, so an actor never waits on the driver."""

CONNECT_SECONDS = 5.0
"""How long ``check_address`` waits for a TCP connection to the cluster."""

WAIT_SECONDS = 0.5
"""How long the driver blocks in ``ray.wait`` before checking again (keeps Ctrl-C responsive)."""


@dataclass
class _Failure:
    """A ``UserError`` raised inside an actor, carried back as its one-line message."""

    message: str


def _ignore_progress(rows: int, positions: int) -> None:
    """Actors report progress per unit through their results, not per batch."""


class TeacherWorker:
    """A Ray actor (once wrapped by ``ray.remote``) that holds the teacher(s) and processes units.

    Args:
        template: the driver's run without teacher modules (settings, resolved top-k, codec).
        threads: torch intra-op threads for CPU teachers (the driver's), or None for GPU actors.
        driver_path: the driver's ``sys.path``, absolute.
    """

    def __init__(self, template: GenerationRun, threads: int | None, driver_path: list[str]) -> None:
        self._template = template
        self._threads = threads
        self._run: GenerationRun | None = None
        # factory modules the driver can import (working directory, PYTHONPATH, a test's sys.path)
        # import the same way here; appended, so the worker's own packages still come first
        sys.path.extend(entry for entry in driver_path if entry not in sys.path)

    def load(self) -> list[str] | _Failure:
        """Load the teachers on this actor's device; returns their sha256 identities."""
        try:
            if self._threads is not None:
                torch.set_num_threads(self._threads)
            device = resolve_device(self._template.config.device, 0)  # Ray maps the actor's GPU to cuda:0
            teachers = [load_teacher(spec, device) for spec in self._template.config.teachers]
        except UserError as exc:
            return _Failure(str(exc))
        self._run = dataclasses.replace(self._template, teachers=teachers, device=device)
        return [teacher.sha256 for teacher in teachers]

    def process(self, unit: Unit, table: pa.Table) -> tuple[ShardPayload, np.ndarray | None] | _Failure:
        """Teacher forward and top-k over one unit, as the local engine computes it.

        Returns:
            The payload without its passthrough rows (the driver still has them), and the bool
            keep-mask of the unit's rows, or None when every row was kept; or a ``_Failure``.
        """
        if self._run is None:
            raise RuntimeError("TeacherWorker.load() must run before process()")
        try:
            payload = process_unit(self._run, unit, table, _ignore_progress)
        except UserError as exc:
            return _Failure(str(exc))
        keep = None
        if payload.passthrough.num_rows != table.num_rows:  # sample ids are unique within a corpus
            kept_ids = payload.passthrough.column("sample_id").combine_chunks()
            keep = pc.is_in(table.column("sample_id").combine_chunks(), value_set=kept_ids).to_numpy(zero_copy_only=False)
        payload.passthrough = table.schema.empty_table()
        return payload, keep


def check_address(address: str | None) -> None:
    """Fail fast, before any work, when nothing listens at a Ray address (``ray.init`` would retry for minutes).

    Args:
        address: ``--ray-address`` (else ``$RAY_ADDRESS``): ``HOST:PORT`` or ``ray://HOST:PORT``;
            None, ``auto`` and ``local`` are not checked.
    """
    flag = "--ray-address"
    if address is None:
        address, flag = os.environ.get("RAY_ADDRESS") or None, "$RAY_ADDRESS"
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{flag} must be HOST:PORT (or ray://HOST:PORT), got {address!r}")
    hosts = [host.strip("[]")]
    try:  # Ray itself dials the node's own IP for a loopback address
        from ray._private.services import resolve_ip_for_localhost

        hosts.append(resolve_ip_for_localhost(hosts[0]))
    except Exception:  # a private helper: only an extra candidate
        pass
    for candidate in dict.fromkeys(hosts):
        try:
            socket.create_connection((candidate, int(port)), timeout=CONNECT_SECONDS).close()
            return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
    raise UserError(f"{flag} {address}: no Ray cluster answers there ({reason})")


def _connect(ray: Any, address: str | None) -> bool:
    """Use an already initialised Ray, or join ``address`` (else ``$RAY_ADDRESS``, as inside a Ray
    job), or start a local Ray of this machine's CPUs; True if this call initialised Ray."""
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}  # stdout stays the summary line
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address is not None:
            ray.init(address=address, **quiet)
            return True
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
    except (ConnectionError, TimeoutError, ValueError) as exc:
        where = f"--ray-address {address}" if address is not None else "--engine ray (local Ray)"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where}: cannot start or reach Ray: {first_line}") from None
    return True


def _actor_layout(ray: Any, run: GenerationRun) -> tuple[int, float, int | None]:
    """(actors, GPUs per actor, torch threads per actor) for this run on this cluster."""
    config = run.config
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpus = config.device == "cuda" or (config.device == "auto" and cluster_gpus > 0)
    if use_gpus and cluster_gpus == 0:
        raise UserError("--device cuda: the Ray cluster has no GPUs")
    actors = config.ray_actors or (cluster_gpus if use_gpus else 1)
    if use_gpus and actors > cluster_gpus:
        raise UserError(f"--ray-actors {actors}: the Ray cluster has only {cluster_gpus} GPUs (one per actor)")
    # CPU kernels can round differently with another thread count (a GRU does), so CPU actors use
    # the driver's, which is what the local engine would use: the numbers stay bitwise identical.
    threads = None if use_gpus else torch.get_num_threads()
    return actors, (1.0 if use_gpus else 0.0), threads


def _start_actors(ray: Any, run: GenerationRun) -> list[Any]:
    """Start the actor pool and wait until every actor holds teachers identical to the driver's."""
    actors_wanted, gpus, threads = _actor_layout(ray, run)
    template = dataclasses.replace(run, teachers=[], corpus=None)  # actors never read the corpus
    worker_class = ray.remote(TeacherWorker).options(num_cpus=ACTOR_CPUS, num_gpus=gpus)
    driver_path = [os.path.abspath(entry or os.curdir) for entry in sys.path]
    actors = [worker_class.remote(template, threads, driver_path) for _ in range(actors_wanted)]
    expected = [teacher.sha256 for teacher in run.teachers]
    for loaded in ray.get([actor.load.remote() for actor in actors]):
        if isinstance(loaded, _Failure):
            raise UserError(loaded.message)
        if loaded != expected:
            raise UserError(
                f"--teacher: a Ray worker loaded different teacher files (sha256 {[s[:12] for s in loaded]}, "
                f"here {[s[:12] for s in expected]}); every node must see the same SPEC paths"
            )
    return actors


def _release_driver_teachers(run: GenerationRun) -> None:
    """The driver only needed its teachers for the probe; free them (and their GPU memory) for actors."""
    run.teachers = [dataclasses.replace(teacher, module=None) for teacher in run.teachers]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_units_on_ray(run: GenerationRun, journal: Journal, pending: list[Unit], on_batch: Callable[[int, int], None],
                     entries: dict[int, dict[str, Any]]) -> None:
    """The Ray engine: compute ``pending`` on an actor pool, commit here; adds to ``entries``.

    Same contract as the local engine: every finished unit is committed through ``commit_unit``
    into ``journal``; on any exception (Ctrl-C included) the actors are stopped, a shard already
    being written completes whole, and the exception propagates so the caller removes partial files.
    Ray is shut down at the end only if this call started it.

    Args:
        run: the prepared run (teachers already probed on the driver).
        journal: this process's journal.
        pending: the units still to compute, in order.
        on_batch: progress callback (rows, positions), called once per finished unit.
        entries: journal entries by unit index; each committed unit is added.
    """
    if not pending:
        return
    import ray

    started = _connect(ray, run.config.ray_address)
    actors: list[Any] = []
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softlabels-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softlabels-write")
    try:
        actors = _start_actors(ray, run)
        _release_driver_teachers(run)
        _pipeline(ray, run, journal, pending, on_batch, entries, actors, reader, writer)
    except BaseException:
        _kill(ray, actors)
        reader.shutdown(wait=False, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)  # a shard already being written completes whole
        raise
    finally:
        _kill(ray, actors)
        if started:
            ray.shutdown()
    reader.shutdown()
    writer.shutdown()


def _pipeline(ray: Any, run: GenerationRun, journal: Journal, pending: list[Unit], on_batch: Callable[[int, int], None],
              entries: dict[int, dict[str, Any]], actors: list[Any], reader: ThreadPoolExecutor,
              writer: ThreadPoolExecutor) -> None:
    queue = iter(pending)

    def read_next() -> tuple[Unit, Future[pa.Table]] | None:
        unit = next(queue, None)
        return None if unit is None else (unit, reader.submit(run.corpus.read_unit, unit))

    upcoming = read_next()
    load = [0] * len(actors)
    in_flight: dict[Any, tuple[Unit, pa.Table, int]] = {}
    writes: deque[Future[dict[str, Any]]] = deque()

    def collect(keep_outstanding: int) -> None:
        while len(writes) > keep_outstanding:
            entry = writes.popleft().result()
            entries[entry["unit"]] = entry

    while upcoming is not None or in_flight:
        while upcoming is not None and len(in_flight) < UNITS_PER_ACTOR * len(actors):
            unit, table_future = upcoming
            table = table_future.result()
            upcoming = read_next()
            actor = min(range(len(actors)), key=load.__getitem__)
            in_flight[actors[actor].process.remote(unit, table)] = (unit, table, actor)
            load[actor] += 1
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_SECONDS)
        for ref in ready:
            unit, table, actor = in_flight.pop(ref)
            load[actor] -= 1
            result = ray.get(ref)
            if isinstance(result, _Failure):
                raise UserError(result.message)
            payload, keep = result
            _own_arrays(payload)
            payload.passthrough = table if keep is None else table.filter(pa.array(keep))  # as process_unit does
            skipped = table.num_rows - payload.passthrough.num_rows
            on_batch(table.num_rows, int(payload.positions.sum()))
            collect(0)  # one shard being written at a time, as in the local engine
            writes.append(writer.submit(commit_unit, run, journal, unit, payload, skipped))
    collect(0)


def _own_arrays(payload: ShardPayload) -> None:
    """Copy result arrays out of the object store: writable, and the store can free the object."""
    for name in ("positions", "ids", "logprobs", "confidence", "entropy", "agreement"):
        value = getattr(payload, name)
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            setattr(payload, name, value.copy())


def _kill(ray: Any, actors: list[Any]) -> None:
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # already dead, or Ray itself is going down
            pass
    actors.clear()
