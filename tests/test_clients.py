"""Real Parquet clients open ``DIR/data`` given as a folder, for every ``--logprob-dtype``.

Each client's row count, confidence filter, top-1 histogram (over every position) and exploded
position count are checked against the same figures computed with pyarrow and numpy from the shard
files. The corpora: a 3-teacher classifier ensemble and ragged token sequences, 117 rows each.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import DIGITS_TEACHERS, classifier_table, run_cli, save_teacher, token_table, write_parquet

DTYPES = ("bfloat16", "float16", "uint8")
KINDS = ("classifier", "tokens")
ROWS = 117
THRESHOLD = 0.7


@pytest.fixture(scope="module")
def soft_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(kind, dtype) -> a sealed soft-label directory."""
    work = tmp_path_factory.mktemp("clients")
    corpora = {
        "classifier": write_parquet(classifier_table(ROWS, seed=3), work / "corpus" / "classifier.parquet"),
        "tokens": write_parquet(token_table(ROWS, seed=5), work / "corpus" / "tokens.parquet"),
    }
    token_teacher = save_teacher("softlabels.models:token_gru", 1, work / "token_gru.safetensors")
    teachers = {"classifier": DIGITS_TEACHERS, "tokens": [token_teacher]}
    found = {}
    for kind in KINDS:
        for dtype in DTYPES:
            out = work / f"{kind}-{dtype}"
            args = ["generate", corpora[kind], "--id-column", "id", "--out", out, "--logprob-dtype", dtype,
                    "--rows-per-shard", 40, "--batch-size", 16, "--no-progress"]
            for spec in teachers[kind]:
                args += ["--teacher", spec]
            result = run_cli(*args)
            assert result.code == 0, result.err
            found[(kind, dtype)] = out
    return found


def reference(data: Path) -> dict[str, object]:
    """The figures from the shard files themselves, with pyarrow and numpy."""
    files = sorted(data.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    confidence = table.column("confidence").to_numpy()
    ids = table.column("topk_ids").combine_chunks()
    top1 = pc.list_flatten(ids).flatten().to_numpy().reshape(-1, len(ids[0][0]))[:, 0]
    return {
        "rows": table.num_rows,
        "confident": int((confidence < THRESHOLD).sum()),
        "top1": Counter(int(c) for c in top1),
        "positions": int(pc.sum(pc.list_value_length(ids)).as_py()),
    }


CASES = [(kind, dtype) for kind in KINDS for dtype in DTYPES]


def test_only_parquet_files_in_data(soft_dirs):
    for out in soft_dirs.values():
        names = sorted(p.name for p in (out / "data").iterdir())
        assert names and all(n.startswith("shard-") and n.endswith(".parquet") for n in names)
        assert (out / "manifest.json").is_file() and not list((out / "data").glob("*.json*"))


@pytest.mark.parametrize("kind,dtype", CASES)
def test_polars_scans_the_folder(soft_dirs, kind, dtype):
    import polars as pl

    data = soft_dirs[(kind, dtype)] / "data"
    expected = reference(data)
    frame = pl.scan_parquet(data)
    assert frame.select(pl.len()).collect().item() == expected["rows"]
    assert frame.filter(pl.col("confidence") < THRESHOLD).select(pl.len()).collect().item() == expected["confident"]
    top1 = frame.select(pl.col("topk_ids").explode().arr.first().alias("top1")).collect()["top1"]
    assert Counter(top1.to_list()) == expected["top1"]
    assert frame.select(pl.col("topk_ids").explode()).select(pl.len()).collect().item() == expected["positions"]


@pytest.mark.parametrize("kind,dtype", CASES)
def test_duckdb_select_star(soft_dirs, kind, dtype):
    import duckdb

    data = soft_dirs[(kind, dtype)] / "data"
    expected = reference(data)
    source = f"read_parquet('{data}/*.parquet')"
    everything = duckdb.sql(f"SELECT * FROM {source}").fetchall()
    assert len(everything) == expected["rows"]
    assert duckdb.sql(f"SELECT count(*) FROM {source} WHERE confidence < {THRESHOLD}").fetchall()[0][0] == expected["confident"]
    top1 = duckdb.sql(f"SELECT p[1] AS top1, count(*) FROM (SELECT unnest(topk_ids) AS p FROM {source}) GROUP BY top1").fetchall()
    assert Counter({int(c): n for c, n in top1}) == expected["top1"]
    assert duckdb.sql(f"SELECT count(*) FROM (SELECT unnest(topk_ids) FROM {source})").fetchall()[0][0] == expected["positions"]


@pytest.mark.parametrize("kind,dtype", CASES)
def test_pandas_reads_the_folder(soft_dirs, kind, dtype):
    import pandas as pd

    data = soft_dirs[(kind, dtype)] / "data"
    expected = reference(data)
    frame = pd.read_parquet(data)
    assert len(frame) == expected["rows"]
    assert int((frame["confidence"] < THRESHOLD).sum()) == expected["confident"]
    assert Counter(int(p[0]) for row in frame["topk_ids"] for p in row) == expected["top1"]
    assert int(frame["topk_ids"].map(len).sum()) == expected["positions"]


@pytest.mark.parametrize("kind,dtype", CASES)
def test_pyarrow_dataset_reads_the_folder(soft_dirs, kind, dtype):
    import pyarrow.dataset as ds

    data = soft_dirs[(kind, dtype)] / "data"
    expected = reference(data)
    dataset = ds.dataset(data, format="parquet")
    assert dataset.count_rows() == expected["rows"]
    assert dataset.count_rows(filter=ds.field("confidence") < THRESHOLD) == expected["confident"]
    ids = dataset.to_table(columns=["topk_ids"]).column("topk_ids")
    positions = pc.list_flatten(ids)
    assert len(positions) == expected["positions"]
    assert Counter(pc.list_element(positions, 0).to_pylist()) == expected["top1"]
    if dtype == "uint8":  # the codes say what they are, in the column's own metadata
        field = dataset.schema.field("topk_logprob_codes")
        assert field.metadata[b"softlabels.codes"] == b"uint8-sqrt"
        assert "topk_logprobs" not in dataset.schema.names


@pytest.mark.parametrize("kind,dtype", CASES)
def test_hf_datasets_load_the_folder(soft_dirs, kind, dtype, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset

    data = soft_dirs[(kind, dtype)] / "data"
    expected = reference(data)
    rows = load_dataset("parquet", data_dir=str(data), split="train", cache_dir=str(data.parent.parent / "hf-cache"))
    assert len(rows) == expected["rows"]
    assert int((np.asarray(rows["confidence"]) < THRESHOLD).sum()) == expected["confident"]
    ids = rows["topk_ids"]
    assert Counter(int(p[0]) for row in ids for p in row) == expected["top1"]
    assert sum(len(row) for row in ids) == expected["positions"]


@pytest.mark.slow
def test_spark_reads_the_default_shards(soft_dirs, tmp_path):
    """pyspark (Java 17) on the default bfloat16 shards, and on uint8 codes; Spark has no float16."""
    pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession, functions as F

    spark = (SparkSession.builder.master("local[1]").appName("softlabels-test")
             .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
             .config("spark.driver.extraJavaOptions", f"-Djava.io.tmpdir={tmp_path}")
             .config("spark.sql.warehouse.dir", str(tmp_path / "warehouse")).getOrCreate())
    spark.sparkContext.setLogLevel("OFF")
    try:
        for key in [(kind, "bfloat16") for kind in KINDS] + [("tokens", "uint8")]:
            data = soft_dirs[key] / "data"
            expected = reference(data)
            frame = spark.read.parquet(str(data))
            assert frame.count() == expected["rows"], key
            assert frame.filter(F.col("confidence") < THRESHOLD).count() == expected["confident"], key
            positions = frame.select(F.explode("topk_ids").alias("p"))
            assert positions.count() == expected["positions"], key
            top1 = positions.select(F.col("p")[0].alias("top1")).groupBy("top1").count().collect()
            assert Counter({int(r["top1"]): int(r["count"]) for r in top1}) == expected["top1"], key
            assert len(frame.collect()) == expected["rows"]  # every column converts
    finally:
        spark.stop()


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_no_machine_paths_in_headers_or_manifest(soft_dirs, tmp_path):
    """Absolute corpus, teacher and --out paths never reach a shard header or the manifest."""
    from conftest import REPO

    corpus = write_parquet(classifier_table(23, seed=9), tmp_path / "deep" / "corpus" / "c.parquet")
    out = tmp_path / "deep" / "out"
    args = ["generate", corpus.resolve(), "--id-column", "id", "--out", out.resolve(), "--no-progress"]
    for spec in DIGITS_TEACHERS:  # absolute weights paths
        args += ["--teacher", spec]
    assert run_cli(*args).code == 0
    assert run_cli("select", out, "--where", "confidence > 0.2", "--out", tmp_path / "deep" / "selected").code == 0
    for directory in [out, tmp_path / "deep" / "selected", *soft_dirs.values()]:
        machine = [str(directory.resolve().parent), str(REPO), str(Path.cwd().resolve())]
        documents = [json.loads((directory / "manifest.json").read_text())]
        for shard in sorted((directory / "data").glob("*.parquet")):
            metadata = pq.read_schema(shard).metadata
            documents.append(json.loads(metadata[b"softlabels"]))
        for document in documents:
            for text in _strings(document):
                for path in machine:
                    assert path not in text, f"{directory}: {text!r} holds {path}"


def test_statistics_columns_are_plainly_encoded(soft_dirs):
    for out in soft_dirs.values():
        metadata = pq.read_metadata(sorted((out / "data").glob("*.parquet"))[0])
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(column)
                if chunk.path_in_schema in ("confidence", "entropy", "agreement"):
                    assert not any("DICTIONARY" in e for e in chunk.encodings), (chunk.path_in_schema, chunk.encodings)


def test_auto_rows_per_shard_aims_at_big_shards():
    """About 2^21 positions per shard, at most 256 MB of inputs in memory, 64..65,536 rows, a power of two."""
    from softlabels.corpus import auto_rows_per_shard

    def lists(length: int, rows: int = 50) -> pa.Array:
        return pa.array([[1] * length] * rows, type=pa.list_(pa.int32()))

    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(64 * 50, dtype=np.float32)), 64)
    assert auto_rows_per_shard(vectors) == 65536  # a classifier: one position a row
    assert auto_rows_per_shard(lists(128)) == 16384  # LLM windows of 128 tokens
    assert auto_rows_per_shard(lists(1000)) == 2048  # 10 s utterances at 100 frames/s
    assert auto_rows_per_shard(lists(2048)) == 1024
    images = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(150528 * 4, dtype=np.float32)), 150528)
    assert auto_rows_per_shard(images) == 256  # 600 KB a row: the 256 MB input cap decides
