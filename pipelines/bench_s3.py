"""generate to S3 against local disk, and what the Ray driver carries per unit.

Starts moto's S3 server in this process (a real S3 HTTP API on loopback), uploads the embedded
digits corpus, then times the digits-ensemble ``generate`` (3 CNN teachers, 1,247 rows) with the
corpus and ``--out`` on local disk and on S3, alternating, ``--rounds`` times; the figure is the
median of the per-round ratios S3 / local. Then one ``--engine ray`` run with two actors reads from
and writes to S3 and records the bytes the driver received per unit (each unit's journal entry, as
JSON) against the shard bytes the actors wrote.

    python pipelines/bench_s3.py --rounds 5

moto keeps objects in memory and serves them over loopback HTTP, so the ratio measures the
protocol's overhead (whole-object uploads, listing, per-object journal records), not a real
network.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHERS = [f"softlabels.models:digits_cnn@{REPO}/data/teachers/digits_cnn_{i}.safetensors" for i in range(3)]


def start_s3() -> object:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows-per-shard", type=int, default=128)
    args = parser.parse_args()
    server = start_s3()
    import boto3

    from softlabels.generate import generate
    from softlabels.options import GenerateConfig
    from softlabels.storage import Location

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    local_corpus = REPO / "data" / "digits" / "unlabeled.parquet"
    s3_corpus = f"s3://{bucket}/corpus/unlabeled.parquet"
    Location.of(s3_corpus).write_bytes(local_corpus.read_bytes())
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))

    def run(corpus: str, out: str, **extra: object) -> tuple[float, object]:
        config = GenerateConfig(corpus=[corpus], teachers=TEACHERS, out=out, id_column="id",
                                rows_per_shard=args.rows_per_shard, progress=False, **extra)
        started = time.perf_counter()
        summary = generate(config)
        return time.perf_counter() - started, summary

    run(str(local_corpus), str(work / "warmup"))  # imports, first teacher load
    ratios, local_times, s3_times = [], [], []
    for index in range(args.rounds):
        local_seconds, local_summary = run(str(local_corpus), str(work / f"local-{index}"))
        s3_seconds, s3_summary = run(s3_corpus, f"s3://{bucket}/out-{index}")
        assert local_summary.bytes == s3_summary.bytes
        local_times.append(local_seconds)
        s3_times.append(s3_seconds)
        ratios.append(s3_seconds / local_seconds)
    units = local_summary.shards

    import ray

    from softlabels import ray_engine

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    received: list[int] = []
    original = ray_engine.run_units_on_ray
    ray_engine.run_units_on_ray = lambda *a, **k: original(*a, **k, received=received)
    ray_seconds, ray_summary = run(s3_corpus, f"s3://{bucket}/ray", engine="ray", ray_actors=2)
    ray.shutdown()
    manifest = json.loads(Location.of(f"s3://{bucket}/ray/manifest.json").read_text())
    shard_bytes = [entry["bytes"] for entry in manifest["shards"]]
    corpus_bytes = local_corpus.stat().st_size
    report = {
        "units": units,
        "rows_per_shard": args.rows_per_shard,
        "local_seconds_median": statistics.median(local_times),
        "s3_seconds_median": statistics.median(s3_times),
        "s3_over_local_median_ratio": statistics.median(ratios),
        "ratios": ratios,
        "ray_seconds": ray_seconds,
        "ray_driver_bytes_per_unit_mean": statistics.mean(received),
        "ray_driver_bytes_per_unit_max": max(received),
        "shard_bytes_per_unit_mean": statistics.mean(shard_bytes),
        "corpus_bytes_per_unit_mean": corpus_bytes / units,
    }
    print(json.dumps(report, indent=2))
    server.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
