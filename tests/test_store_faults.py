"""Object-store faults, injected by an HTTP proxy in front of the moto server (tests/faults.py).

Transient 5xx answers and connection resets end byte-identical to a clean run; an outage, a store
that cannot be reached, a missing bucket and a refused permission are each one line and exit 1 (a
missing bucket before any teacher loads); a rerun after an outage completes identical; a failed
multipart write leaves no object and no pending upload; a store outage while training is reported
as the store failing, never as a damaged shard.
"""

from __future__ import annotations

import importlib
import hashlib
import socket

import pytest

from conftest import DIGITS_TEACHERS, classifier_table, run_cli, upload, write_parquet
from faults import ACCESS_DENIED, Rule, faulty_store
from softlabels.errors import UserError
from softlabels.storage import Location, StoreError

TEACHER = DIGITS_TEACHERS[0]


@pytest.fixture
def faulty_s3(s3_endpoint, monkeypatch):
    """A fresh bucket behind a fault proxy; AWS_ENDPOINT_URL points at the proxy for the test."""
    yield from faulty_store(s3_endpoint, monkeypatch)


@pytest.fixture
def corpus(tmp_path, faulty_s3) -> str:
    local = write_parquet(classifier_table(117, seed=41), tmp_path / "corpus.parquet")
    return upload(local, f"{faulty_s3.bucket}/corpus/digits.parquet")


def generate(corpus: str, out: str, *extra: object):
    return run_cli("generate", corpus, "--out", out, "--teacher", TEACHER, "--id-column", "id", "--label-column", "label",
                   "--rows-per-shard", 37, "--batch-size", 11, "--no-progress", *extra)


def contents(uri: str) -> dict[str, str]:
    """sha256 of every object under a run directory: the shards and the manifest, by relative name."""
    root = Location.of(uri)
    names = [p.uri[len(uri) + 1:] for p in root.walk()]
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names if n == "manifest.json" or n.startswith("data/")}


def assert_one_line_error(result, *words: str) -> None:
    assert result.code == 1, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("rule", [
    Rule(status=500, fraction=0.3, streak=2, seed=1),
    Rule(status=503, fraction=0.5, streak=2, seed=2),
    Rule(action="reset", fraction=0.25, streak=2, seed=3),
    Rule(action="reset-after", fraction=0.15, streak=2, seed=4),
], ids=["500-30%", "503-50%", "reset-25%", "reset-after-15%"])
def test_transient_faults_end_identical_to_a_clean_run(faulty_s3, corpus, rule):
    clean = f"{faulty_s3.bucket}/clean"
    assert generate(corpus, clean).code == 0
    faulty_s3.proxy.add(rule)
    out = f"{faulty_s3.bucket}/faulty"
    result = generate(corpus, out)
    faulty_s3.proxy.clear()
    assert result.code == 0, result.err
    assert rule.failed >= 5, f"only {rule.failed} of {rule.seen} requests failed"  # the faults really happened
    expected = contents(clean)
    assert len(expected) == 5 and contents(out) == expected  # 4 shards and the manifest, byte for byte
    assert run_cli("verify", out).code == 0
    assert faulty_s3.pending_uploads() == []


def test_outage_mid_run_is_one_line_and_a_rerun_completes_identical(faulty_s3, corpus):
    clean = f"{faulty_s3.bucket}/clean"
    assert generate(corpus, clean).code == 0
    out = f"{faulty_s3.bucket}/out"
    # the store goes down as the second shard is written, and stays down
    rule = faulty_s3.proxy.add(Rule(action="outage", method="PUT", path=r"/out/data/shard-", nth=(2,)))
    failed = generate(corpus, out)
    assert rule.failed == 1 and faulty_s3.proxy.down
    # the shard's write or the overlapped corpus read, whichever meets the outage first, names its URI
    assert_one_line_error(failed, faulty_s3.bucket, "cannot reach the object store", "rerun")
    assert "unreadable" not in failed.err and "corrupt" not in failed.err
    faulty_s3.proxy.clear()  # the store is back
    assert not (Location.of(out) / "manifest.json").is_file()
    assert len(faulty_s3.keys("out/data/")) == 1  # the first shard, whole; nothing of the second
    rerun = generate(corpus, out)
    assert rerun.code == 0, rerun.err
    assert "3 written this run" in rerun.out
    assert contents(out) == contents(clean)


def test_unreachable_endpoint_is_one_line(tmp_path, s3_endpoint, monkeypatch):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SOFTLABELS_STORE_RETRIES", "1")
    corpus = write_parquet(classifier_table(23, seed=2), tmp_path / "c.parquet")
    result = generate(corpus, "s3://softlabels-unreachable/out")
    assert_one_line_error(result, "s3://softlabels-unreachable/out", "cannot reach the object store", f"127.0.0.1:{port}")
    # a store CORPUS: the same line, naming the corpus
    result = generate("s3://softlabels-unreachable/corpus/c.parquet", tmp_path / "out")
    assert_one_line_error(result, "s3://softlabels-unreachable/corpus", "cannot reach the object store")


def test_missing_bucket_is_refused_before_the_teacher_loads(tmp_path, faulty_s3, monkeypatch):
    generate_module = importlib.import_module("softlabels.generate")  # softlabels.generate is the function

    loaded = []
    real = generate_module.load_teacher
    monkeypatch.setattr(generate_module, "load_teacher", lambda *a, **k: loaded.append(a) or real(*a, **k))
    corpus = write_parquet(classifier_table(23, seed=2), tmp_path / "c.parquet")
    result = generate(corpus, "s3://softlabels-no-such-bucket/out")
    assert_one_line_error(result, "--out s3://softlabels-no-such-bucket/out", "bucket 'softlabels-no-such-bucket' does not exist")
    assert loaded == []
    # the same CORPUS and teacher into the real bucket load the teacher: the check above ran before it
    assert generate(corpus, f"{faulty_s3.bucket}/out").code == 0 and len(loaded) == 1

    trained = run_cli("train-student", f"{faulty_s3.bucket}/out", "--student", "softlabels.models:digits_mlp", "--max-steps", 2,
                      "--out", "s3://softlabels-no-such-bucket/student", "--no-progress")
    assert_one_line_error(trained, "s3://softlabels-no-such-bucket/student", "does not exist")
    missing_data = run_cli("train-student", "s3://softlabels-no-such-bucket/soft", "--student", "softlabels.models:digits_mlp",
                           "--max-steps", 2, "--out", tmp_path / "student", "--no-progress")
    assert_one_line_error(missing_data, "s3://softlabels-no-such-bucket/soft", "does not exist")


def test_permission_denied_is_one_line(tmp_path, faulty_s3):
    corpus = write_parquet(classifier_table(23, seed=2), tmp_path / "c.parquet")
    faulty_s3.proxy.add(Rule(status=403, body=ACCESS_DENIED, method="PUT", fraction=1.0))
    result = generate(corpus, f"{faulty_s3.bucket}/out")
    assert_one_line_error(result, f"{faulty_s3.bucket}/out", "permission denied")
    faulty_s3.proxy.clear()
    assert faulty_s3.keys() == [] and faulty_s3.pending_uploads() == []


def test_failed_multipart_write_leaves_no_object_and_no_pending_upload(faulty_s3):
    target = Location.of(f"{faulty_s3.bucket}/big.bin")
    data = bytes(range(256)) * (47 * 1024 + 3) * 2  # about 24 MiB: three parts
    faulty_s3.proxy.add(Rule(status=500, method="PUT", path=r"partNumber=2", fraction=1.0))
    with pytest.raises(StoreError, match="big.bin"):
        target.write_bytes(data)
    assert faulty_s3.proxy.count("POST", r"\?uploads") == 1  # it did go up in parts
    assert faulty_s3.keys() == [] and faulty_s3.pending_uploads() == []
    faulty_s3.proxy.clear()
    # the upload of a writer killed mid-write (the store was down for its abort) ...
    faulty_s3.client().create_multipart_upload(Bucket=faulty_s3.name, Key="big.bin")
    assert faulty_s3.pending_uploads() == ["big.bin"]
    target.write_bytes(data)  # ... is aborted by the next whole write of the key, which lands whole
    assert target.read_bytes() == data and faulty_s3.pending_uploads() == []


def test_small_objects_are_read_through_5xx(faulty_s3):
    """The AWS SDK gives up on a 5xx whose error document is longer than the object being read
    ("Failed to flush response stream"); whole-object reads retry it like any transient fault."""
    for size in (1, 7, 129):
        record = Location.of(f"{faulty_s3.bucket}/_journal/rank-00000/record-{size}.json")
        record.write_bytes(b"{" * size)
        rule = faulty_s3.proxy.add(Rule(status=503, method="GET", fraction=1.0, streak=2))
        assert record.read_bytes() == b"{" * size and rule.failed == 2
        faulty_s3.proxy.clear()


@pytest.mark.parametrize("workers", [0, 1])
def test_store_outage_while_training_blames_the_store_not_a_shard(tmp_path, faulty_s3, corpus, workers):
    from softlabels import SoftLabelDataset

    data = f"{faulty_s3.bucket}/soft"
    assert generate(corpus, data).code == 0
    # train-student reads shards to verify them, then their footers, then trains: the first read
    # after as many as verify and opening the dataset make is the training loop's first
    before = faulty_s3.proxy.count("GET", r"/soft/data/shard-")
    assert run_cli("verify", data).code == 0
    SoftLabelDataset(data, batch_size=16, verify_sha256=False)
    setup = faulty_s3.proxy.count("GET", r"/soft/data/shard-") - before
    rule = faulty_s3.proxy.add(Rule(action="outage", method="GET", path=r"/soft/data/shard-", nth=(setup + 1,)))
    result = run_cli("train-student", data, "--student", "softlabels.models:digits_mlp", "--max-steps", 4, "--batch-size", 16,
                     "--no-progress", "--num-workers", workers, "--out", tmp_path / "student")
    assert rule.failed == 1
    assert_one_line_error(result, "/soft/data/shard-", "object store")
    assert "unreadable" not in result.err and "corrupt" not in result.err
    assert not (tmp_path / "student" / "student.safetensors").exists()


def test_dataset_reads_during_an_outage_raise_a_store_error(faulty_s3, corpus):
    from softlabels import SoftLabelDataset

    data = f"{faulty_s3.bucket}/soft"
    assert generate(corpus, data).code == 0
    dataset = SoftLabelDataset(data, batch_size=8, verify_sha256=False)  # the Parquet reads themselves
    faulty_s3.proxy.outage()
    with pytest.raises(UserError) as raised:
        next(iter(dataset))
    assert isinstance(raised.value, StoreError) and "shard-" in str(raised.value) and "\n" not in str(raised.value)
    verified = run_cli("verify", data)  # exit 1, the store failed; not 2, which says the data is damaged
    assert_one_line_error(verified, data, "object store")


def test_proxy_faults_are_deterministic():
    """The same seed fails the same requests, whatever order threads send them in."""
    def failures(order: list[str]) -> set[tuple[str, int]]:
        rule, seen, failed = Rule(fraction=0.4, seed=7), {}, set()
        for path in order:
            seen[path] = seen.get(path, 0) + 1
            if rule.decide("GET", path):
                failed.add((path, seen[path]))
        return failed

    paths = [f"/b/k{i % 13}" for i in range(200)]
    assert failures(paths) == failures(sorted(paths)) and 40 < len(failures(paths)) < 120
    capped = Rule(fraction=1.0, streak=2)
    assert [capped.decide("PUT", "/b/x") for _ in range(6)] == [True, True, False, True, True, False]
