"""The quickstart path end to end: generate on the embedded digits ensemble, then verify."""

from __future__ import annotations

import json

from conftest import DIGITS_TEACHERS, DIGITS_UNLABELED, read_output, run_cli


def test_generate_digits_ensemble_then_verify(tmp_path):
    out = tmp_path / "digits"
    args = ["generate", DIGITS_UNLABELED, "--id-column", "id", "--out", out, "--rows-per-shard", 500, "--no-progress"]
    for spec in DIGITS_TEACHERS:
        args += ["--teacher", spec]
    result = run_cli(*args)
    assert result.code == 0, result.err
    assert "1,247 rows" in result.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["vocab_size"] == 10 and len(manifest["teachers"]) == 3
    assert [s["rows"] for s in manifest["shards"]] == [500, 500, 247]
    table = read_output(out)
    assert table.num_rows == 1247 and "agreement" in table.column_names
    assert run_cli("verify", out).code == 0
