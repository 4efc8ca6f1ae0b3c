"""Bookkeeping that scales (issue 11): ``verify --quick``, and a 2,000-shard directory end to end.

The synthetic directories come from ``pipelines/bench_bookkeeping.py`` (the benchmark's own
builder): the real ``generate`` commits unit 0 of an N-unit run, the shard writer writes the other
units' shards with their own headers, each with its journal line, and the manifest is built as
``seal`` builds it.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "pipelines"))
from bench_bookkeeping import build_synthetic  # noqa: E402

SHARDS = 2000


def _snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (relative path) and the sha256 of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _flip_a_data_page_byte(path: Path) -> None:
    """Flip the last byte of the first column chunk's pages: inside a data page, far from the footer."""
    chunk = pq.read_metadata(path).row_group(0).column(0)
    offset = chunk.data_page_offset + chunk.total_compressed_size - 1
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "run"
    build_synthetic(out, 3)
    return out


def test_quick_verify_checks_sizes_and_footers_but_not_the_bytes(small: Path, tmp_path: Path) -> None:
    directory = tmp_path / "run"
    shutil.copytree(small, directory)
    for args in ([], ["--quick"]):
        result = run_cli("verify", directory, *args)
        assert result.code == 0 and "3 shards" in result.out, result.err
    assert "quick" in run_cli("verify", directory, "--quick").out

    flipped = directory / "data" / "shard-000001.parquet"
    original = flipped.read_bytes()
    _flip_a_data_page_byte(flipped)
    quick = run_cli("verify", directory, "--quick")
    assert quick.code == 0, quick.err  # a page's bytes are not read: that is what makes it quick
    full = run_cli("verify", directory)
    assert full.code == 2 and "shard-000001.parquet" in full.err and "sha256" in full.err, (full.code, full.err)
    flipped.write_bytes(original)

    victim = directory / "data" / "shard-000002.parquet"
    victim.write_bytes(victim.read_bytes()[:-100])
    for args in (["--quick"], []):
        result = run_cli("verify", directory, *args)
        assert result.code == 2 and "shard-000002.parquet" in result.err and "bytes on disk" in result.err, (args, result.err)

    victim.unlink()
    result = run_cli("verify", directory, "--quick")
    assert result.code == 2 and "shard-000002.parquet: missing" in result.err, result.err


def test_a_quick_verify_refuses_a_shard_of_another_run(small: Path, tmp_path: Path) -> None:
    directory = tmp_path / "run"
    shutil.copytree(small, directory)
    other = tmp_path / "other"
    build_synthetic(other, 2)  # another corpus (two rows): another fingerprint, same size of shard
    theirs, ours = other / "data" / "shard-000001.parquet", directory / "data" / "shard-000001.parquet"
    if theirs.stat().st_size != ours.stat().st_size:
        pytest.skip("the other run's shard differs in size; the size check would catch it first")
    shutil.copy(theirs, ours)
    result = run_cli("verify", directory, "--quick")
    assert result.code == 2 and "shard-000001.parquet" in result.err and "another run" in result.err, result.err


def test_two_thousand_shards_seal_verify_load_and_resume_without_work(tmp_path: Path) -> None:
    from softlabels.data import SoftLabelDataset

    out = tmp_path / "run"
    built = build_synthetic(out, SHARDS)
    assert len(list((out / "data").iterdir())) == SHARDS
    sealed = (out / "manifest.json").read_bytes()

    for args in (["--quick"], []):
        result = run_cli("verify", out, *args)
        assert result.code == 0 and f"{SHARDS} shards" in result.out and f"{SHARDS:,} rows" in result.out, result.err

    (out / "manifest.json").unlink()
    result = run_cli("seal", out)
    assert result.code == 0 and f"sealed, {SHARDS} shards" in result.out, result.err
    assert (out / "manifest.json").read_bytes() == sealed  # the builder's manifest is the one seal writes

    dataset = SoftLabelDataset(out, batch_size=64, shuffle=True, seed=1)
    assert len(dataset.shards) == SHARDS and sum(p.rows for p in dataset.pieces) == SHARDS
    assert dataset.num_batches() == -(-SHARDS // 64)
    assert 1 <= dataset.first_batch()["topk_ids"].shape[0] <= 64

    before = _snapshot(out)
    again = run_cli(*built["command"][3:])
    assert again.code == 0 and "already complete, nothing to do" in again.out, again.err
    assert _snapshot(out) == before  # no shard written, no journal line, the same manifest, nothing new


def test_a_torn_journal_line_costs_only_its_own_shard(tmp_path: Path) -> None:
    """The journal is parsed as one document for speed; a line torn by a crash falls back to line by line."""
    from softlabels.rundir import Journal
    from softlabels.storage import Location

    journal = Journal(Location.of(tmp_path / "rank-00000.jsonl"))
    journal.start({"fingerprint": "f" * 16, "settings": {}})
    for unit in range(3):
        journal.append({"file": f"shard-{unit:06d}.parquet", "unit": unit, "rows": 1})
    whole = journal.read()
    assert whole[0]["fingerprint"] == "f" * 16 and [e["unit"] for e in whole[1]] == [0, 1, 2]
    text = journal.path.read_text()
    journal.path.write_text(text + '{"kind": "shard", "file": "shard-000003.par')  # killed mid-append
    assert journal.read() == whole
    journal.append({"file": "shard-000004.parquet", "unit": 4, "rows": 1})  # the torn tail is cut off first: not lost
    journal.append({"file": "shard-000005.parquet", "unit": 5, "rows": 1})
    assert [e["unit"] for e in journal.read()[1]] == [0, 1, 2, 4, 5]
    assert "shard-000003" not in journal.path.read_text()
