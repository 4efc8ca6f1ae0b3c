"""The committed digits teachers load strictly into digits_cnn() and are good, distinct teachers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from softlabels.models import DIGITS_CLASSES, DIGITS_FEATURES, digits_cnn, digits_mlp

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_PARQUET = REPO_ROOT / "data" / "digits" / "test.parquet"
TEACHERS = [REPO_ROOT / "data" / "teachers" / f"digits_cnn_{i}.safetensors" for i in range(3)]


def _test_split() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels float32 [N, 64] and labels int64 [N] of data/digits/test.parquet."""
    table = pq.read_table(TEST_PARQUET, columns=["inputs", "label"])
    flat = table["inputs"].combine_chunks().flatten().to_numpy()
    x = torch.from_numpy(np.array(flat, dtype=np.float32).reshape(-1, DIGITS_FEATURES))
    y = torch.from_numpy(table["label"].to_numpy().astype(np.int64))
    return x, y


def _load_teacher(path: Path) -> torch.nn.Module:
    model = digits_cnn()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


@pytest.mark.parametrize("factory", [digits_mlp, digits_cnn])
def test_digits_models_shape_and_dtype(factory) -> None:
    torch.manual_seed(0)
    out = factory()(torch.rand(5, DIGITS_FEATURES))
    assert out.shape == (5, DIGITS_CLASSES)
    assert out.dtype == torch.float32


def test_committed_teachers_accurate_and_distinct() -> None:
    x, y = _test_split()
    n = x.shape[0]
    assert n > 0
    preds = []
    for path in TEACHERS:
        with torch.no_grad():
            logits = _load_teacher(path)(x)
        assert logits.shape == (n, DIGITS_CLASSES)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        pred = logits.argmax(dim=-1)
        acc = (pred == y).float().mean().item()
        assert acc > 0.9, f"{path.name}: test accuracy {acc:.4f}"
        preds.append(pred)
    stacked = torch.stack(preds)  # [3, N]
    disagree = (stacked != stacked[0]).any(dim=0)
    assert disagree.any(), "the three teachers predict identically on every test row"

