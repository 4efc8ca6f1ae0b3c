"""The manifest checks itself, and ``data/`` holds exactly the dataset (issue 19, items 4 and 5).

One small sealed run (37 rows, 2 teachers, units of 16: three shards, the last of 5 rows) is made once
per module by ``pipelines/manifest_flip_sweep.py`` and copied for each test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from softlabels.data import SoftLabelDataset
from softlabels.errors import VerificationError
from softlabels.rundir import manifest_text

from conftest import REPO, CliResult, data_dir, run_cli

sys.path.insert(0, str(REPO / "pipelines"))
import manifest_flip_sweep as sweep_module  # noqa: E402

SHARDS = [f"shard-{i:06d}.parquet" for i in range(3)]


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sweep_module.build_run(tmp_path_factory.mktemp("integrity"))


@pytest.fixture
def out(original: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(original, tmp_path / "run"))


def generate_again(original: Path, out: Path) -> CliResult:
    """The command that made ``original``, pointed at ``out``."""
    args: list[object] = ["generate", original.parent / "corpus.parquet", "--out", out, "--id-column", "id", "--label-column", "label",
                          "--rows-per-shard", sweep_module.ROWS_PER_SHARD, "--top-k", 5, "--no-progress"]
    for spec in sweep_module.TEACHERS:
        args += ["--teacher", spec]
    return run_cli(*args)


def raw(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def write_raw(directory: Path, data: dict) -> None:
    """The manifest as edited, checksum left as it was."""
    (directory / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True))


def one_line_failure(result: CliResult, code: int, *needles: object) -> str:
    assert result.code == code, (result.code, result.out, result.err)
    lines = result.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]}"
    return lines[0]


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the checksum


def test_manifest_carries_the_sha256_of_its_own_body(original: Path) -> None:
    data = raw(original)
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    expected = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert data["manifest_sha256"] == expected
    assert "manifest_integrity" in body
    assert run_cli("verify", original).code == 0


@pytest.mark.parametrize("edit", ["top_k", "settings.top_k", "vocab_size", "fidelity", "totals.skipped_nonfinite", "teacher name"])
def test_any_edit_fails_verify_and_every_reader(out: Path, edit: str) -> None:
    data = raw(out)
    if edit == "top_k":
        data["top_k"] = 4
    elif edit == "settings.top_k":
        data["settings"]["top_k"] = 4
    elif edit == "vocab_size":
        data["vocab_size"] += 1
    elif edit == "fidelity":
        data["fidelity"]["captured_mass_mean"] = 0.5
    elif edit == "totals.skipped_nonfinite":
        data["totals"]["skipped_nonfinite"] = 1
    else:
        data["teachers"][0]["name"] = "someone-else.pt2"
    write_raw(out, data)
    one_line_failure(run_cli("verify", out), 2, f"{out / 'manifest.json'}", "checksum")
    one_line_failure(run_cli("verify", "--quick", out), 2, "manifest.json")
    one_line_failure(run_cli("inspect", out), 2, "manifest.json")
    with pytest.raises(VerificationError, match="manifest.json"):
        SoftLabelDataset(out)


@pytest.mark.parametrize("how", ["deleted", "renamed", "marker deleted", "wrong type"])
def test_the_checksum_key_itself_cannot_switch_the_check_off(out: Path, how: str) -> None:
    data = raw(out)
    data["top_k"] = 4  # an edit that the cross-checks would also catch; here the checksum must
    if how == "deleted":
        del data["manifest_sha256"]
    elif how == "renamed":
        data["manifest_sha257"] = data.pop("manifest_sha256")
    elif how == "marker deleted":
        del data["manifest_integrity"]
    else:
        data["manifest_sha256"] = 0
    write_raw(out, data)
    one_line_failure(run_cli("verify", out), 2, "manifest.json")


def test_a_manifest_of_an_earlier_release_without_a_checksum_is_still_read(out: Path) -> None:
    sweep_module.strip_checksum(out)
    assert "manifest_sha256" not in raw(out)
    result = run_cli("verify", out)
    assert result.code == 0, result.err
    assert sum(1 for _ in SoftLabelDataset(out, batch_size=8, shuffle=False)) == 5  # 16 + 16 + 5 rows in batches of 8


def test_a_renamed_shard_sha256_key_is_refused_even_with_a_forged_checksum(out: Path) -> None:
    (data_dir(out) / SHARDS[1]).write_bytes(b"\0" * (data_dir(out) / SHARDS[1]).stat().st_size)  # same size, other bytes
    data = raw(out)
    data["shards"][1]["sha257"] = data["shards"][1].pop("sha256")
    write_raw(out, data)
    one_line_failure(run_cli("verify", out), 2, "checksum")
    (out / "manifest.json").write_text(manifest_text(data))  # a checksum that matches the edit
    one_line_failure(run_cli("verify", out), 2, "shards[1]", "sha256")


# ---------------------------------------------------------------- cross-checks against the shard headers


@pytest.mark.parametrize(("field", "value"), [("top_k", 4), ("vocab_size", 11), ("ensemble", "logprobs"), ("format", "softlabels.v1"),
                                              ("teacher_temperature", 2.0), ("label_column", None), ("input_column", "x"),
                                              ("logprob_dtype", "float16"), ("teachers", "sha"), ("fingerprint", "0" * 16)])
def test_fields_the_shard_headers_hold_are_cross_checked(out: Path, field: str, value: object) -> None:
    """A manifest edited with a matching checksum (a forgery, or a writer's bug): the headers give it away."""
    data = raw(out)
    if field == "teachers":
        data["teachers"][1]["sha256"] = "0" * 64
    else:
        data[field] = value
    if field == "fingerprint":
        data["settings"]["id_column"] = data["settings"]["id_column"]  # the settings still hash to the old one
    (out / "manifest.json").write_text(manifest_text(data))
    line = one_line_failure(run_cli("verify", out), 2)
    if field == "fingerprint":
        assert "fingerprint" in line
    elif field == "format":
        assert SHARDS[0] in line  # read as v1, the shards are looked for beside the manifest
    else:
        assert line.startswith(f"verification failed: {SHARDS[0]}: its header and the manifest differ on {field}:"), line


def test_a_shard_entry_whose_positions_disagree_with_its_header_is_refused(out: Path) -> None:
    data = raw(out)
    data["shards"][2]["positions"] += 1
    data["totals"]["positions"] += 1
    (out / "manifest.json").write_text(manifest_text(data))
    one_line_failure(run_cli("verify", "--quick", out), 2, SHARDS[2], "positions")


# ---------------------------------------------------------------- data/ holds exactly the dataset


@pytest.mark.parametrize("stray", ["foreign parquet named like a shard", "renamed shard", "text file", "folder"])
def test_any_file_in_data_that_the_manifest_does_not_list_is_refused_by_every_reader(original: Path, out: Path, stray: str) -> None:
    if stray == "foreign parquet named like a shard":
        name = "shard-000003.parquet"
        shutil.copy2(original.parent / "corpus.parquet", data_dir(out) / name)
    elif stray == "renamed shard":
        name = "shard-000007.parquet"
        shutil.copy2(data_dir(out) / SHARDS[1], data_dir(out) / name)  # readers of data/ would see its rows twice
    elif stray == "text file":
        name = "README.txt"
        (data_dir(out) / name).write_text("notes")
    else:
        name = "extra"
        (data_dir(out) / name).mkdir()
    for args in (("verify", out), ("verify", "--quick", out), ("inspect", out)):
        one_line_failure(run_cli(*args), 2, data_dir(out) / name, "not listed")
    with pytest.raises(VerificationError, match=name):
        SoftLabelDataset(out)
    one_line_failure(run_cli("train-student", out, "--student", "softlabels.models:digits_mlp", "--out", out.parent / "student",
                             "--max-steps", 1, "--no-progress"), 2, name)


def test_generate_refuses_a_renamed_shard_instead_of_duplicating_its_rows(original: Path, out: Path) -> None:
    """The issue's case: a shard renamed to an unused index. Before, generate redid the unit and verify
    said OK while every reader saw its rows twice."""
    (data_dir(out) / SHARDS[1]).rename(data_dir(out) / "shard-000009.parquet")
    before = files(out)
    one_line_failure(generate_again(original, out), 1, "data/shard-000009.parquet")
    assert files(out) == before
    one_line_failure(run_cli("verify", out), 2, "shard-000009.parquet", "not listed")


def test_generate_refuses_a_shard_of_another_run_under_an_unused_index(original: Path, out: Path, tmp_path: Path) -> None:
    other = sweep_module.build_run(tmp_path / "other_corpus")  # another corpus: another fingerprint
    shutil.copy2(data_dir(other) / SHARDS[0], data_dir(out) / "shard-000002.parquet")
    shutil.copy2(data_dir(other) / SHARDS[1], data_dir(out) / "shard-000005.parquet")
    (data_dir(out) / "shard-000002.parquet").unlink()  # unit 2 missing; shard-000005 is not this run's
    one_line_failure(generate_again(original, out), 1, "data/shard-000005.parquet")


def test_generate_keeps_its_own_unjournalled_shard_and_redoes_it(original: Path, out: Path) -> None:
    """kill -9 between the rename into data/ and the journal line: the file is this run's, and is redone."""
    journal = out / "_journal" / "rank-00000.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(line for line in lines if SHARDS[2] not in line))
    (out / "manifest.json").unlink()
    result = generate_again(original, out)
    assert result.code == 0 and "(1 written this run)" in result.out, result.err
    assert files(out) == files(original)


@pytest.mark.parametrize("where", ["data", "data/sub", "data/sub/deeper"])
def test_out_inside_a_runs_data_folder_is_refused_before_any_work(original: Path, out: Path, where: str) -> None:
    before = files(out)
    target = out / where
    one_line_failure(generate_again(original, target), 1, f"inside {out / 'data'}")
    one_line_failure(run_cli("select", out, "--where", "confidence > 0", "--out", target), 1, f"inside {out / 'data'}")
    one_line_failure(run_cli("train-student", out, "--student", "softlabels.models:digits_mlp", "--out", target, "--max-steps", 1,
                             "--no-progress"), 1, f"inside {out / 'data'}")
    assert files(out) == before and run_cli("verify", out).code == 0


def test_a_folder_named_data_elsewhere_is_a_fine_out(original: Path, tmp_path: Path) -> None:
    result = generate_again(original, tmp_path / "data")  # no manifest or journal beside it
    assert result.code == 0, result.err


# ---------------------------------------------------------------- a damaged manifest is rebuilt


@pytest.mark.parametrize("damage", ["settings.top_k flipped", "truncated", "unparsable", "checksum key renamed"])
def test_generate_rebuilds_a_damaged_manifest_from_its_journals(original: Path, out: Path, damage: str) -> None:
    path = out / "manifest.json"
    text = path.read_text()
    if damage == "settings.top_k flipped":  # the case: generate used to refuse this run forever
        data = raw(out)
        data["settings"]["top_k"] = 4
        write_raw(out, data)
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "unparsable":
        path.write_bytes(b"\xff" + text.encode()[1:])
    else:
        path.write_text(text.replace('"manifest_sha256"', '"manifest_sha2S6"'))
    one_line_failure(run_cli("verify", out), 2, "manifest.json", "softlabels seal")
    result = generate_again(original, out)
    assert result.code == 0, result.err
    assert "(0 written this run)" in result.out
    assert "rebuilding it from this run's journals" in result.err
    assert files(out) == files(original)


def test_seal_rebuilds_a_damaged_manifest(original: Path, out: Path) -> None:
    data = raw(out)
    data["totals"]["rows"] = 36
    write_raw(out, data)
    result = run_cli("seal", out)
    assert result.code == 0 and "rebuilt" in result.out, result.err
    assert files(out) == files(original)


def test_a_damaged_manifest_without_journals_says_what_to_do(original: Path, out: Path) -> None:
    shutil.rmtree(out / "_journal")
    (out / "manifest.json").write_text((out / "manifest.json").read_text().replace('"top_k": 5', '"top_k": 4'))
    before = files(out)
    one_line_failure(generate_again(original, out), 2, "manifest.json", "no journal")
    one_line_failure(run_cli("seal", out), 2, "manifest.json", "no journal")
    assert files(out) == before


# ---------------------------------------------------------------- the flip sweep, sampled


def test_flip_sweep_sample_finds_no_silent_wrong_flip(out: Path) -> None:
    text = (out / "manifest.json").read_bytes()
    flips = sweep_module.sample_flips(text, 300, seed=19)
    counts, findings = sweep_module.sweep(out, flips, quick=True)
    assert findings == [] and counts["silent_wrong"] == counts["crash"] == 0
    assert counts["rejected"] >= len(flips) - 5  # single-bit flips almost never keep the JSON's meaning
    assert (out / "manifest.json").read_bytes() == text  # put back after every flip
    counts, findings = sweep_module.sweep(out, flips[::10], with_others=True)  # inspect and the loader too
    assert findings == [], findings[:3]


def test_flip_sweep_finds_silent_flips_where_there_is_no_checksum(out: Path) -> None:
    """The sweep can fail: on a manifest stripped of its checksum (as an earlier release wrote it),
    flips of fields nothing else records (fidelity, teacher names) pass every reader."""
    sweep_module.strip_checksum(out)
    text = (out / "manifest.json").read_bytes()
    start = text.find(b'"fidelity"')
    flips = [(offset, 0x01) for offset in range(start, start + 400) if chr(text[offset]).isdigit()]
    counts, _ = sweep_module.sweep(out, flips, quick=True)
    assert counts["silent_wrong"] > 0
