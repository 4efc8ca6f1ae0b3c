"""``softlabels generate --engine ray``: a pool of Ray actors that each run the unit pipeline.

Each actor loads the teacher(s) once, from the same SPECs, on its own device, and runs the same
``pipeline.run_pipeline`` as the local engine on its share of the units: it reads each unit's rows
from the corpus (a local path every node sees, or a store URI), computes, and writes the shard to
``--out`` itself. The driver sends unit indices and receives, per committed unit, its journal entry
(a few hundred bytes: name, rows, positions, size, sha256, fidelity), which it journals; the rows
and the shard bytes never pass through the driver, so its NIC and disk are not the ceiling. Resume,
the journal and sealing are the local engine's, and a run started with one engine and resumed with
the other gives the same directory; the engine is not part of the run fingerprint.

CPU actors run torch with the driver's thread count, because CPU kernels may round differently with
another one (a GRU does); with it, shards are bitwise identical to the local engine's. Actors take
units round-robin and stream their entries back as each shard is committed (a Ray streaming
generator), so a unit is journalled moments after its shard is whole.

On a cluster, the teacher SPECs must resolve at the same paths on every node (actors check that
their teachers hash to the driver's), and ``--out`` and the corpus must be reachable from every
node: an object store URI, or a shared filesystem.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .corpus import Unit
from .errors import UserError
from .pipeline import GenerationRun, ignore_progress, process_unit, run_pipeline, write_unit
from .rundir import Journal, ShardEntry
from .distributed import resolve_device
from .teachers import load_teacher

__all__ = ["ACTOR_CPUS", "TeacherWorker", "check_address", "run_units_on_ray"]

ACTOR_CPUS = 0.5
"""CPUs each actor reserves: fractional, so one actor never starves a 2-CPU machine's driver and tasks."""

CONNECT_SECONDS = 5.0
"""How long ``check_address`` waits for a TCP connection to the cluster."""

WAIT_SECONDS = 0.5
"""How long the driver blocks in ``ray.wait`` before checking again (keeps Ctrl-C responsive)."""


@dataclass
class _Failure:
    """A ``UserError`` raised inside an actor, carried back as its one-line message."""

    message: str


class TeacherWorker:
    """A Ray actor (once wrapped by ``ray.remote``) that holds the teacher(s) and runs the unit pipeline.

    Args:
        template: the driver's run without teacher modules (settings, corpus units, output directory).
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

    def run_units(self, indices: list[int]) -> Iterator[ShardEntry | _Failure]:
        """Read, compute and write these units here; yields each unit's journal entry once its shard is whole."""
        run = self._run
        if run is None:
            raise RuntimeError("TeacherWorker.load() must run before run_units()")
        units = [run.corpus.units[index] for index in indices]
        try:
            yield from run_pipeline(
                units, run.read_unit,
                lambda unit, table: process_unit(run, unit, table, ignore_progress),
                lambda unit, payload, skipped: write_unit(run, unit, payload, skipped),
            )
        except UserError as exc:
            yield _Failure(str(exc))


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
    template = dataclasses.replace(run, teachers=[])
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
                     entries: dict[int, ShardEntry], received: list[int] | None = None) -> None:
    """The Ray engine: actors read, compute and write ``pending``; the driver journals; adds to ``entries``.

    Same contract as the local engine: every unit is journalled after its shard is whole; on any
    exception (Ctrl-C included) the actors are stopped and the exception propagates, so the caller
    removes partial files. Ray is shut down at the end only if this call started it.

    Args:
        run: the prepared run (teachers already probed on the driver).
        journal: this process's journal.
        pending: the units still to compute, in order.
        on_batch: progress callback (rows, positions), called once per committed unit.
        entries: journal entries by unit index; each committed unit is added.
        received: when given, the size in bytes (as JSON) of what the driver received for each unit.
    """
    if not pending:
        return
    import ray

    started = _connect(ray, run.config.ray_address)
    actors: list[Any] = []
    try:
        actors = _start_actors(ray, run)
        _release_driver_teachers(run)
        _collect(ray, journal, pending, on_batch, entries, actors, received)
    finally:
        _kill(ray, actors)
        if started:
            ray.shutdown()


def _collect(ray: Any, journal: Journal, pending: list[Unit], on_batch: Callable[[int, int], None],
             entries: dict[int, ShardEntry], actors: list[Any], received: list[int] | None) -> None:
    """Deal the units round-robin to the actors and journal each entry as it streams back."""
    units = {unit.index: unit for unit in pending}
    shares = [[unit.index for unit in pending[i::len(actors)]] for i in range(len(actors))]
    streams = [actor.run_units.options(num_returns="streaming").remote(share) for actor, share in zip(actors, shares) if share]
    waiting = {stream: stream for stream in streams}
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=WAIT_SECONDS)  # short, so Ctrl-C is seen
        for stream in ready:
            try:
                ref = next(stream)
            except StopIteration:
                waiting.pop(stream)
                continue
            result = ray.get(ref)
            if isinstance(result, _Failure):
                raise UserError(result.message)
            if received is not None:
                received.append(len(json.dumps(result)))
            journal.append(result)
            entries[result["unit"]] = result
            unit = units[result["unit"]]
            on_batch(unit.rows, int(result["positions"]))


def _kill(ray: Any, actors: list[Any]) -> None:
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # already dead, or Ray itself is going down
            pass
    actors.clear()
