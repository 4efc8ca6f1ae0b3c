"""The run directory's lifecycle calls (begin, seal_if_complete, sealed, open_sealed), checked against a
run that ``generate`` made and sealed: what they plan and the manifest they write must agree with it."""

from __future__ import annotations

import pytest

from conftest import digits_mlp_soft_labels, shard_path

from softlabels.errors import NotSealedError, UserError
from softlabels.rundir import RunDirectory, RunSpec, manifest_run_header, settings_fingerprint, validate_shard

UNITS = 3  # 53 rows in units of 25: 25, 25, 3


@pytest.fixture()
def run(tmp_path):
    """A sealed run (3 units), its manifest's bytes, and the spec generate began it with."""
    out = digits_mlp_soft_labels(tmp_path)
    manifest = RunDirectory.open(out).open_sealed()
    spec = RunSpec(manifest["fingerprint"], manifest["settings"], manifest_run_header(manifest), UNITS)
    return out, (out / "manifest.json").read_bytes(), spec


def test_begin_on_a_sealed_run_has_nothing_pending_and_keeps_its_manifest(run):
    out, sealed, spec = run
    plan = RunDirectory.open(out).begin(spec)
    assert (plan.mine, plan.pending, sorted(plan.committed)) == ([0, 1, 2], [], [0, 1, 2])
    assert plan.sealed is not None and plan.sealed["totals"]["rows"] == 53
    assert (out / "manifest.json").read_bytes() == sealed


def test_seal_if_complete_writes_the_manifest_generate_wrote(run):
    out, sealed, spec = run
    (out / "manifest.json").unlink()  # committed, journalled, not sealed
    directory = RunDirectory.open(out)
    assert directory.sealed() is None
    with pytest.raises(NotSealedError):
        directory.open_sealed()
    plan = directory.begin(spec)
    assert plan.sealed is None and plan.pending == []
    assert directory.seal_if_complete(plan, plan.committed) is not None
    assert (out / "manifest.json").read_bytes() == sealed
    assert directory.sealed(spec.fingerprint) is not None and directory.sealed("0" * 16) is None


def test_a_damaged_shard_is_pending_and_unseals_the_run(run):
    out, _, spec = run
    damaged = shard_path(out, 1)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 tells
    damaged.write_bytes(bytes(data))
    directory = RunDirectory.open(out)
    plan = directory.begin(spec)
    assert (plan.pending, sorted(plan.committed)) == ([1], [0, 2])
    assert not (out / "manifest.json").exists() and directory.sealed() is None
    with pytest.raises(NotSealedError, match="no manifest.json"):
        directory.open_sealed()
    partial = directory.open_sealed(allow_partial=True)  # the journalled shards, the damaged one included
    assert partial["complete"] is False
    assert [e["file"] for e in partial["shards"]] == ["shard-000000.parquet", "shard-000001.parquet", "shard-000002.parquet"]
    footer = validate_shard(directory.shard_path("shard-000000.parquet"), partial["shards"][0], partial, check_types=False)
    assert footer.rows == 25 and footer.row_groups and sum(footer.row_groups) == 25


def test_ranks_plan_their_own_units_and_only_the_last_seals(run):
    out, sealed, spec = run
    (out / "manifest.json").unlink()
    directory = RunDirectory.open(out)
    plan = directory.begin(spec, rank=1, world=2)
    assert (plan.mine, plan.pending) == ([1], [])
    assert directory.seal_if_complete(plan, plan.committed) is not None  # every rank's journal says all are in place
    assert (out / "manifest.json").read_bytes() == sealed


def test_other_settings_are_refused_by_flag_before_begin_writes(run):
    out, _, spec = run
    settings = {**spec.settings, "rows_per_shard": 26}
    other = RunSpec(settings_fingerprint(settings), settings, spec.header, UNITS, {"rows_per_shard": "--rows-per-shard"})
    journal = next((out / "_journal").iterdir())
    before = journal.read_bytes()
    with pytest.raises(UserError, match=r"holds a run with different settings \(--rows-per-shard: DIR has 25, this run 26\)"):
        RunDirectory.open(out).begin(other)
    assert (out / "manifest.json").exists() and journal.read_bytes() == before
