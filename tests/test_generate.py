"""generate behaviours not covered elsewhere: masked (-inf) classes are legitimate outputs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import classifier_table, read_output, run_cli, save_teacher, write_parquet


# the fp16 floor as each float storage keeps it: float16 exactly, bfloat16 rounded to 8 mantissa bits
FLOORS = {"float16": float(np.finfo(np.float16).min), "bfloat16": -65536.0}


@pytest.mark.parametrize("dtype", sorted(FLOORS))
def test_minus_infinity_logits_are_masked_classes_not_errors(tmp_path, dtype):
    corpus = write_parquet(classifier_table(31, seed=4), tmp_path / "c.parquet")
    spec = save_teacher("fixture_teachers:masked_classifier", 0, tmp_path / "m.safetensors")
    result = run_cli("generate", corpus, "--teacher", spec, "--out", tmp_path / "out", "--id-column", "id",
                     "--top-k", 10, "--logprob-dtype", dtype, "--no-progress")
    assert result.code == 0, result.err
    table = read_output(tmp_path / "out")
    ids = np.stack([np.asarray(r) for r in table.column("topk_ids").combine_chunks().flatten().to_pylist()])
    logprobs = np.stack([np.asarray(r, dtype=np.float32) for r in table.column("topk_logprobs").combine_chunks().flatten().to_pylist()])
    # the two masked classes have probability 0: they come last with the fp16 floor as log-probability
    assert set(ids[:, -2:].ravel()) == {1, 6}
    assert np.all(logprobs[:, -2:] == np.float32(FLOORS[dtype]))
    assert np.allclose(np.exp(logprobs[:, :-2].astype(np.float64)).sum(axis=1), 1.0, atol=5e-3)


def _digits_model(seed: int) -> torch.nn.Module:
    from softlabels.models import digits_cnn

    torch.manual_seed(seed)
    return digits_cnn().eval()


def test_exported_program_and_pt_state_dict_teachers_equal_the_factory(tmp_path):
    """.pt2 (torch.export, dynamic batch) and .pt (weights_only) load the same numbers as safetensors."""
    from safetensors.torch import save_file

    corpus = write_parquet(classifier_table(53, seed=6), tmp_path / "c.parquet")
    model = _digits_model(3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.rand(4, 64),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(tmp_path / "teacher.pt2"))
    outputs = {}
    for name, spec in (("safetensors", f"softlabels.models:digits_cnn@{tmp_path / 'w.safetensors'}"),
                       ("pt", f"softlabels.models:digits_cnn@{tmp_path / 'w.pt'}"),
                       ("pt2", str(tmp_path / "teacher.pt2"))):
        result = run_cli("generate", corpus, "--teacher", spec, "--out", tmp_path / name, "--id-column", "id",
                         "--rows-per-shard", 20, "--batch-size", 7, "--no-progress")
        assert result.code == 0, result.err
        outputs[name] = read_output(tmp_path / name).select(["sample_id", "topk_ids", "topk_logprobs", "confidence", "entropy"])
    assert outputs["pt"].equals(outputs["safetensors"])
    ids = outputs["pt2"].column("topk_ids").to_pylist()
    assert ids == outputs["safetensors"].column("topk_ids").to_pylist()
    ours = np.array(outputs["pt2"].column("topk_logprobs").to_pylist(), dtype=np.float32)
    theirs = np.array(outputs["safetensors"].column("topk_logprobs").to_pylist(), dtype=np.float32)
    assert np.allclose(ours, theirs, atol=2e-3)


def test_exported_sequence_teacher_gets_lengths(tmp_path):
    """A .pt2 frame tagger exported with dynamic batch and time is called as model(x, lengths).

    float16 storage, so the comparison can hold to float16 rounding (2e-3 at these log-probabilities)."""
    from softlabels.models import frame_tagger

    from conftest import frame_table

    corpus = write_parquet(frame_table(29, seed=8), tmp_path / "f.parquet")
    torch.manual_seed(2)
    model = frame_tagger().eval()
    batch, steps = torch.export.Dim("batch", min=1), torch.export.Dim("steps", min=2)
    example = (torch.randn(3, 9, 13), torch.tensor([9, 4, 1]))
    program = torch.export.export(model, example, dynamic_shapes={"x": {0: batch, 1: steps}, "lengths": {0: batch}})
    torch.export.save(program, str(tmp_path / "tagger.pt2"))
    result = run_cli("generate", corpus, "--teacher", tmp_path / "tagger.pt2", "--out", tmp_path / "out", "--id-column", "id",
                     "--top-k", 5, "--batch-size", 6, "--logprob-dtype", "float16", "--no-progress")
    assert result.code == 0, result.err
    table = read_output(tmp_path / "out")
    source = pq.read_table(corpus).to_pydict()
    by_id = dict(zip(source["id"], source["inputs"]))
    for sample_id, ids, logprobs in zip(table.column("sample_id").to_pylist(), table.column("topk_ids").to_pylist(),
                                        table.column("topk_logprobs").to_pylist()):
        frames = torch.tensor([by_id[sample_id]], dtype=torch.float32)
        with torch.no_grad():
            expected = torch.log_softmax(model(frames, torch.tensor([frames.shape[1]]))[0], dim=-1)
        values, _ = expected.topk(5, dim=-1)
        assert len(ids) == frames.shape[1]
        assert np.allclose(np.array(logprobs, dtype=np.float32), values.numpy(), atol=2e-3)
