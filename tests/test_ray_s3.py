"""Ray actors do their own I/O: they read the corpus from S3 and write shards to S3 themselves.

Two actors at half a CPU each, on a local Ray started after the in-process S3 server (moto), so the
workers inherit its endpoint from the environment as they would a cluster's. The driver reads only
the two-row vocabulary probe and receives only journal entries.
"""

from __future__ import annotations

import hashlib
import logging

import pytest

from conftest import DIGITS_TEACHERS, classifier_table, upload, write_parquet
from softlabels.corpus import Corpus
from softlabels.generate import generate
from softlabels.options import GenerateConfig
from softlabels.storage import Location

ray = pytest.importorskip("ray")

ENTRY_BYTES_LIMIT = 2048


@pytest.fixture(scope="module")
def ray_after_s3(s3_endpoint):
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


def hashes(uri: str) -> dict[str, str]:
    data = Location.of(uri) / "data"
    return {name: hashlib.sha256((data / name).read_bytes()).hexdigest() for name in data.listdir()}


def config(corpus: str, out: str, **extra: object) -> GenerateConfig:
    return GenerateConfig(corpus=[corpus], teachers=DIGITS_TEACHERS[:2], out=out, id_column="id", rows_per_shard=30,
                          batch_size=16, progress=False, **extra)


def test_ray_actors_read_and_write_s3_themselves(ray_after_s3, s3_bucket, tmp_path, monkeypatch):
    local = write_parquet(classifier_table(117, seed=41), tmp_path / "c.parquet")
    corpus = upload(local, f"{s3_bucket}/corpus/c.parquet")
    reference = generate(config(corpus, f"{s3_bucket}/local"))
    assert reference.shards == 4

    driver_reads: list[int] = []
    original_read = Corpus.read_unit

    def counting_read(self, unit):  # the driver's own reads; actors run unpatched code in other processes
        driver_reads.append(unit.rows)
        return original_read(self, unit)

    monkeypatch.setattr(Corpus, "read_unit", counting_read)
    received: list[int] = []
    from softlabels import ray_engine

    original_engine = ray_engine.run_units_on_ray
    monkeypatch.setattr(ray_engine, "run_units_on_ray",
                        lambda *args, **kwargs: original_engine(*args, **kwargs, received=received))
    summary = generate(config(corpus, f"{s3_bucket}/ray", engine="ray", ray_actors=2))
    assert summary.shards == 4 and summary.shards_written == 4
    assert hashes(f"{s3_bucket}/ray") == hashes(f"{s3_bucket}/local")
    assert driver_reads == [2], "the driver read corpus rows beyond the two-row vocabulary probe"
    assert len(received) == 4 and max(received) < ENTRY_BYTES_LIMIT
    shard_bytes = min(len((Location.of(f"{s3_bucket}/ray") / "data" / n).read_bytes()) for n in hashes(f"{s3_bucket}/ray"))
    assert max(received) * 4 < shard_bytes  # what the driver got per unit is a small fraction of a shard
