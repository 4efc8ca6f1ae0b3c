"""``set_epoch`` reaches persistent DataLoader workers, and the dataset tracks consumption itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from conftest import DIGITS_TEACHERS, classifier_table, run_cli, write_parquet
from softlabels import SoftLabelDataset, SoftLabelLoader
from softlabels.errors import UserError

ROWS = 117


@pytest.fixture(scope="module")
def soft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("epochs")
    corpus = write_parquet(classifier_table(ROWS, seed=11), work / "c.parquet", row_group_size=13)
    out = work / "out"
    args = ["generate", corpus, "--id-column", "id", "--out", out, "--rows-per-shard", 29, "--no-progress"]
    for spec in DIGITS_TEACHERS[:2]:
        args += ["--teacher", spec]
    assert run_cli(*args).code == 0
    return out


def epoch_ids(loader, dataset: SoftLabelDataset, epoch: int) -> list[str]:
    dataset.set_epoch(epoch)
    return [sample for batch in loader for sample in batch["sample_id"]]


def test_persistent_workers_follow_set_epoch(soft_dir):
    dataset = SoftLabelDataset(soft_dir, batch_size=7, shuffle=True, seed=3)
    loader = SoftLabelLoader(dataset, num_workers=2, persistent_workers=True)
    orders = [epoch_ids(loader, dataset, epoch) for epoch in range(3)]
    every_row = sorted(f"s-{i:05d}" for i in range(ROWS))
    for order in orders:
        assert sorted(order) == every_row  # each row exactly once per epoch
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    # the same orders as fresh (non-persistent) workers, which are built after set_epoch
    for epoch, order in enumerate(orders):
        fresh = SoftLabelDataset(soft_dir, batch_size=7, shuffle=True, seed=3)
        assert epoch_ids(SoftLabelLoader(fresh, num_workers=2), fresh, epoch) == order


def test_a_plain_dataloader_with_persistent_workers_also_follows_set_epoch(soft_dir):
    dataset = SoftLabelDataset(soft_dir, batch_size=7, shuffle=True, seed=5)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True)
    first, second = epoch_ids(loader, dataset, 0), epoch_ids(loader, dataset, 1)
    assert sorted(first) == sorted(second) and first != second


def test_resume_point_is_tracked_without_the_trainer(soft_dir):
    """Take 5 batches through two prefetching workers, save, resume in a new loader: the rest follows exactly."""
    reference = SoftLabelDataset(soft_dir, batch_size=6, shuffle=True, seed=7)
    everything = [batch["sample_id"] for batch in SoftLabelLoader(reference, num_workers=2)]

    dataset = SoftLabelDataset(soft_dir, batch_size=6, shuffle=True, seed=7)
    taken = []
    for batch in SoftLabelLoader(dataset, num_workers=2, prefetch_factor=4):
        taken.append(batch["sample_id"])
        if len(taken) == 5:
            break
    state = dataset.state_dict()
    assert state["batches"] == 5

    resumed = SoftLabelDataset(soft_dir, batch_size=6, shuffle=True, seed=7)
    resumed.load_state_dict(state)
    rest = [batch["sample_id"] for batch in SoftLabelLoader(resumed, num_workers=2)]
    assert taken + rest == everything


def test_state_dict_refuses_when_workers_were_not_watched(soft_dir):
    dataset = SoftLabelDataset(soft_dir, batch_size=6, shuffle=True, seed=7)
    for index, _ in enumerate(DataLoader(dataset, batch_size=None, num_workers=2)):
        if index == 2:
            break
    with pytest.raises(UserError, match="SoftLabelLoader"):
        dataset.state_dict()


def test_shards_whose_manifest_is_gone_open_from_their_headers(soft_dir, tmp_path):
    """``without_manifest=True``: the run comes from the shards' own headers; same batches, no sha256 left."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(soft_dir, copy)
    (copy / "manifest.json").unlink()
    shutil.rmtree(copy / "_journal")
    with pytest.raises(Exception, match="manifest"):
        SoftLabelDataset(copy, batch_size=9)
    reference = SoftLabelDataset(soft_dir, batch_size=9, shuffle=True, seed=4)
    orphan = SoftLabelDataset(copy, batch_size=9, shuffle=True, seed=4, without_manifest=True)
    assert orphan.manifest["fingerprint"] == reference.manifest["fingerprint"]
    assert [e["positions"] for e in orphan.manifest["shards"]] == [e["positions"] for e in reference.manifest["shards"]]
    for ours, theirs in zip(orphan, reference, strict=True):
        assert ours["sample_id"] == theirs["sample_id"]
        assert (ours["topk_logprobs"] == theirs["topk_logprobs"]).all() and (ours["topk_ids"] == theirs["topk_ids"]).all()
