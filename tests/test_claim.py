"""The one output claim (softlabels/claim.py) that generate, select, train-student and init-student make of
their --out: how an output meets an input, the order of the checks, the one message form of each
refusal, and the lease taken last.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from softlabels.claim import check_output, claim_output, names_in, overlap
from softlabels.errors import UserError
from softlabels.lease import LOCAL_NAME, LeaseHeld, hold_lease, lease_scope
from softlabels.storage import Location

STORE = object()  # a stand-in filesystem: overlap reads only the URIs of store locations


def at(uri: str) -> Location:
    return Location(uri, uri.split("://", 1)[1], STORE)


def test_overlap_of_local_paths_resolves_links_and_compares_whole_names(tmp_path):
    (tmp_path / "corpus" / "part").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "corpus")
    corpus = Location.of(tmp_path / "corpus")
    assert overlap(Location.of(tmp_path / "link"), corpus) == "is"
    assert overlap(Location.of(tmp_path / "corpus" / "part" / "new"), corpus) == "is inside"
    assert overlap(Location.of(tmp_path / "link" / "new"), corpus) == "is inside"
    assert overlap(Location.of(tmp_path), corpus) == "holds"
    assert overlap(Location.of(tmp_path / "corpus2"), corpus) is None  # a common prefix is not a common folder
    assert overlap(Location.of(tmp_path / "corpus"), at("s3://bucket" + str(tmp_path / "corpus"))) is None


def test_overlap_of_store_uris_compares_them_as_written():
    assert overlap(at("s3://b/run"), at("s3://b/run/")) == "is"
    assert overlap(at("s3://b/run/sel"), at("s3://b/run")) == "is inside"
    assert overlap(at("s3://b/run"), at("s3://b/run/corpus/*.parquet")) == "holds"
    assert overlap(at("s3://b/runs"), at("s3://b/run")) is None
    assert overlap(at("gs://b/run"), at("s3://b/run")) is None


def test_each_refusal_is_one_line_in_the_order_of_the_checks(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("the user's\n")
    (tmp_path / "afile").write_text("x\n")
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "manifest.json").write_text("{}\n")
    calls = []

    def foreign(out: Location) -> str | None:
        calls.append(out.uri)
        return next(iter(names_in(out)), None)

    def refusal(out: Path, inputs=()) -> str:
        with pytest.raises(UserError) as caught:
            check_output(out, "softlabels x", foreign, inputs)
        assert len(str(caught.value).splitlines()) == 1
        return str(caught.value)

    assert refusal(tmp_path / "afile") == f"--out {tmp_path / 'afile'} exists and is not a directory"
    assert refusal(run / "data" / "sel").startswith(f"--out {run / 'data' / 'sel'} is inside {run / 'data'}, the data folder")
    assert refusal(corpus, [(corpus, "CORPUS")]) == f"--out {corpus} is CORPUS {corpus}; choose another --out"
    assert refusal(tmp_path, [(corpus, "CORPUS")]) == f"--out {tmp_path} holds CORPUS {corpus}; choose another --out"
    assert not calls, "the foreign rule ran before the cheaper checks refused"
    assert refusal(corpus) == f"--out {corpus} holds notes.txt, which softlabels x did not write; give an empty or new --out"
    assert calls == [str(corpus)]


def test_the_lease_is_taken_last_and_is_no_foreign_file(tmp_path):
    out = tmp_path / "out"

    @lease_scope
    def command() -> list[str]:
        claim_output(out, "softlabels x", lambda place: next(iter(names_in(place)), None))
        return os.listdir(out)

    assert command() == [LOCAL_NAME]  # held while the command runs
    assert not out.exists()  # released, and the folder it made removed
    with hold_lease(out, "softlabels y"):
        assert names_in(Location.of(out)) == []
        with pytest.raises(LeaseHeld, match=f"--out {out} is being written by 'softlabels y'"):
            command()
        (out / "notes.txt").write_text("the user's\n")
        with pytest.raises(UserError, match="holds notes.txt, which softlabels x did not write"):
            command()  # refused by the checks, before it asks for the lease
