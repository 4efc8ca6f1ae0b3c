"""Shards written before a change and after it: committed reference runs against fresh ones.

tests/fixtures/reference holds four sealed runs made by tests/fixtures/make_reference_runs.py (top-k
and sampled targets, a classifier ensemble and ragged tokens, fp32 and bf16 compute, bfloat16, float16
and uint8 storage) and the fingerprint of the machine that made them. Each case is generated again
here with the code under test:

* on the same machine (CPU model, torch version, thread count and softlabels version as recorded):
  every shard file and the manifest are byte-identical;
* anywhere (the only check on another machine): equal to storage precision (conftest's ``assert_equal_to_storage_precision`` for top-k;
  for sampled targets the same bound on the stored log-probabilities of the draws both runs made),
  and the settings, fingerprint and counts are equal, the shards' byte counts within 1% (compressed
  sizes move with the values' last bits).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import softlabels
from conftest import FLOAT32_EPS, REPO, assert_equal_to_storage_precision, tolerance
from softlabels.codec import LogprobCodec

sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from make_reference_runs import CASES, REFERENCE, generate, machine  # noqa: E402

SAMPLE_SOFT = ("sample_ids", "sample_counts", "sample_logprobs", "sample_logprob_codes", "sample_log_normalizer")


def recorded_machine() -> dict[str, object]:
    return json.loads((REFERENCE / "machine.json").read_text())


def same_machine() -> bool:
    recorded = recorded_machine()
    here = machine()
    reference_version = json.loads((REFERENCE / "classifier-topk" / "manifest.json").read_text())["softlabels_version"]
    return recorded == here and reference_version == softlabels.__version__


def files(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "_journal" not in p.parts}


def table(run: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((run / "data").glob("shard-*.parquet"))])


def nested(table: pa.Table, column: str) -> list[list[list[float]]]:
    return table.column(column).to_pylist()


def assert_sampled_equal_to_storage_precision(ours: pa.Table, theirs: pa.Table) -> None:
    """Pass-through columns equal; row statistics to float32 reordering; at every position whose draws
    are the same ids and counts in both runs the stored log-probabilities within ``tolerance``; a
    draw may move only where the teacher's CDF sits at a key's boundary (under 1% of positions)."""
    assert ours.schema == theirs.schema and ours.num_rows == theirs.num_rows
    for name in ours.column_names:
        if name not in SAMPLE_SOFT + ("confidence", "entropy", "agreement"):
            assert ours.column(name).equals(theirs.column(name)), name
    for name in ("confidence", "entropy"):
        np.testing.assert_allclose(ours.column(name).to_numpy(), theirs.column(name).to_numpy(), rtol=1e-5, atol=FLOAT32_EPS)
    column = next(n for n in ("sample_logprobs", "sample_logprob_codes") if n in ours.column_names)
    codec = LogprobCodec.from_columns(pa.schema([ours.schema.field(column).with_name(
        "topk_logprobs" if column == "sample_logprobs" else "topk_logprob_codes")]))
    dtype = ours.schema.field(column).type.value_type.value_type.to_pandas_dtype()
    rows = zip(nested(ours, "sample_ids"), nested(ours, "sample_counts"), nested(ours, column),
               nested(theirs, "sample_ids"), nested(theirs, "sample_counts"), nested(theirs, column))
    same = moved = 0
    for ids_a, counts_a, values_a, ids_b, counts_b, values_b in rows:
        assert len(ids_a) == len(ids_b)
        for pa_, ca, va, pb, cb, vb in zip(ids_a, counts_a, values_a, ids_b, counts_b, values_b):
            if pa_ != pb or ca != cb:
                moved += 1
                continue
            same += 1
            a = codec.decode_numpy(np.array(va, dtype=dtype)).astype(np.float64)
            b = codec.decode_numpy(np.array(vb, dtype=dtype)).astype(np.float64)
            assert (np.abs(a - b) <= tolerance(codec, a, b)).all()
    assert moved <= 0.01 * (same + moved), f"{moved} of {same + moved} positions drew other ids"


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_fresh_run_equals_the_committed_reference(tmp_path, case):
    fresh = tmp_path / case
    generate(case, REFERENCE, fresh)
    reference = REFERENCE / case
    if same_machine():
        assert files(fresh) == files(reference)
    # the comparison another CPU gets (it also holds here)
    mine, theirs = json.loads((fresh / "manifest.json").read_text()), json.loads((reference / "manifest.json").read_text())
    for key in ("fingerprint", "settings", "teachers", "targets"):
        assert mine.get(key) == theirs.get(key), key
    # byte counts are of compressed shards, whose size moves with the last bits of the values (another
    # CPU's kernels): equal on the reference machine (above), within 1% elsewhere; the counts are exact
    sizes = {k for k in theirs["totals"] if k.endswith("bytes")}
    assert {k: v for k, v in mine["totals"].items() if k not in sizes} == {k: v for k, v in theirs["totals"].items() if k not in sizes}
    for key in sizes:
        assert mine["totals"][key] == pytest.approx(theirs["totals"][key], rel=0.01), key
    if "topk_ids" in table(reference).column_names:
        assert_equal_to_storage_precision(table(fresh), table(reference))
    else:
        assert_sampled_equal_to_storage_precision(table(fresh), table(reference))


def test_the_reference_machine_is_recorded():
    """The fingerprint the byte comparison rests on names a CPU, a torch version and the pinned thread count."""
    recorded = recorded_machine()
    assert set(recorded) == {"cpu", "torch", "threads"} and recorded["threads"] == 1 and recorded["cpu"]
