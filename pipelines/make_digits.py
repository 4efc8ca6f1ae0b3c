"""Build the committed digits quickstart data: splits and an ensemble of three teachers.

Semi-supervised setting: scikit-learn's bundled digits (1,797 8x8 images) is split, stratified by
class, into a small labeled set (the ONLY data the teachers train on), a large unlabeled corpus
(what soft labels get computed on; its labels are held out in a separate file so student accuracy
can be measured later) and a labeled test set.

Writes under --out (default ``data``):

    digits/labeled.parquet            id, inputs, label      (--labeled rows)
    digits/unlabeled.parquet          id, inputs             (the rest)
    digits/unlabeled_labels.parquet   id, label              (held out)
    digits/test.parquet               id, inputs, label      (--test rows)
    teachers/digits_cnn_{0,1,2}.safetensors   state_dict of softlabels.models.digits_cnn()
    README.md

``id`` is ``digits-NNNN`` with the original scikit-learn row index, ``inputs`` is
``fixed_size_list<float32>[64]`` (values / 16, so in [0, 1]), ``label`` is int64.

Each teacher (a small CNN) trains on the labeled set with random 1-pixel shifts and its own init
and augmentation seed (full-batch AdamW, fp32, CPU), so the ensemble members genuinely differ, and
together they beat an MLP trained on the same labels: the knowledge distillation has to carry.

scikit-learn is a dev-only dependency, needed only here.

Run from the repository root:  python pipelines/make_digits.py --out data --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout, package not installed
    sys.path.insert(0, str(REPO_ROOT))

from softlabels.models import DIGITS_CLASSES, DIGITS_FEATURES, digits_cnn  # noqa: E402

N_TEACHERS = 3


def _split(labels: np.ndarray, n_labeled: int, n_test: int, seed: int) -> tuple[np.ndarray, ...]:
    """Stratified three-way split of row indices: (labeled, unlabeled, test), each sorted."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(labels.shape[0])
    rest, test = train_test_split(idx, test_size=n_test, stratify=labels, random_state=seed)
    unlabeled, labeled = train_test_split(
        rest, test_size=n_labeled, stratify=labels[rest], random_state=seed + 1
    )
    return np.sort(labeled), np.sort(unlabeled), np.sort(test)


def _table(idx: np.ndarray, pixels: np.ndarray | None, labels: np.ndarray | None) -> pa.Table:
    """Arrow table with id, then pixels (fixed_size_list<float32>[64]) and/or label (int64)."""
    cols: dict[str, pa.Array] = {"id": pa.array([f"digits-{i:04d}" for i in idx], pa.string())}
    if pixels is not None:
        flat = pa.array(np.ascontiguousarray(pixels[idx], dtype=np.float32).reshape(-1))
        cols["inputs"] = pa.FixedSizeListArray.from_arrays(flat, DIGITS_FEATURES)
    if labels is not None:
        cols["label"] = pa.array(labels[idx].astype(np.int64))
    return pa.table(cols)


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    print(f"wrote {path} ({table.num_rows} rows, {path.stat().st_size:,} bytes)")


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by -1, 0 or +1 pixel along each axis (zero fill): [N, 64] -> [N, 64]."""
    images = torch.nn.functional.pad(x.view(-1, 8, 8), (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=gen)
    rows = (torch.arange(8)[None, :] + dy[:, None])[:, :, None].expand(-1, 8, 8)
    cols = (torch.arange(8)[None, :] + dx[:, None])[:, None, :].expand(-1, 8, 8)
    picked = images[torch.arange(x.shape[0])[:, None, None], rows, cols]
    return picked.reshape(-1, 64)


def _train_teacher(
    x: torch.Tensor, y: torch.Tensor, seed: int, steps: int, lr: float, weight_decay: float
) -> torch.nn.Module:
    """Train digits_cnn() full-batch on (x [N, 64], y [N]) with random 1-pixel shifts.

    The augmentation is the teachers' advantage over a student that sees the same 150 labels
    plainly: it is the knowledge the soft labels carry to the unlabeled rows.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = digits_cnn()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(_shift(x, gen)), y)
        loss.backward()
        opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data"), help="output root (default: data)")
    ap.add_argument("--seed", type=int, default=0, help="split and training seed (default: 0)")
    ap.add_argument("--labeled", type=int, default=150, help="labeled rows (default: 150)")
    ap.add_argument("--test", type=int, default=400, help="test rows (default: 400)")
    ap.add_argument("--steps", type=int, default=400, help="full-batch steps per teacher (default: 400)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    args = ap.parse_args(argv)

    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)  # [1797, 64] in [0, 1]
    labels = digits.target.astype(np.int64)  # [1797]
    if pixels.shape[1] != DIGITS_FEATURES or labels.max() + 1 != DIGITS_CLASSES:
        raise ValueError(f"unexpected digits shape {pixels.shape}")
    lab, unl, tst = _split(labels, args.labeled, args.test, args.seed)

    out: Path = args.out
    _write(_table(lab, pixels, labels), out / "digits" / "labeled.parquet")
    _write(_table(unl, pixels, None), out / "digits" / "unlabeled.parquet")
    _write(_table(unl, None, labels), out / "digits" / "unlabeled_labels.parquet")
    _write(_table(tst, pixels, labels), out / "digits" / "test.parquet")

    torch.set_num_threads(1)  # bit-stable across machines with different core counts
    x_lab, y_lab = torch.from_numpy(pixels[lab]), torch.from_numpy(labels[lab])
    x_tst, y_tst = torch.from_numpy(pixels[tst]), torch.from_numpy(labels[tst])
    probs, accs = [], []
    for t in range(N_TEACHERS):
        seed = args.seed * 1000 + t
        model = _train_teacher(x_lab, y_lab, seed, args.steps, args.lr, args.weight_decay)
        path = out / "teachers" / f"digits_cnn_{t}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path), metadata={"factory": "softlabels.models:digits_cnn"})
        with torch.no_grad():
            p = torch.softmax(model(x_tst), dim=-1)  # [N_test, 10]
        probs.append(p)
        acc = (p.argmax(-1) == y_tst).float().mean().item()
        accs.append(acc)
        print(f"teacher {t}: seed {seed}, test accuracy {acc:.4f}  ({path}, {path.stat().st_size:,} bytes)")
    ens = torch.stack(probs).mean(0)
    ens_acc = (ens.argmax(-1) == y_tst).float().mean().item()
    print(f"ensemble (mean of probabilities): test accuracy {ens_acc:.4f}")

    _write_readme(out, args, len(lab), len(unl), len(tst), accs, ens_acc)
    return 0


def _write_readme(
    out: Path,
    args: argparse.Namespace,
    n_lab: int,
    n_unl: int,
    n_tst: int,
    accs: list[float],
    ens_acc: float,
) -> None:
    accs_txt = ", ".join(f"{a:.2%}" for a in accs)
    cmd = f"python pipelines/make_digits.py --out {args.out} --seed {args.seed}"
    text = f"""# data/

Small committed inputs for the quickstart, generated by `pipelines/make_digits.py` from
scikit-learn's bundled digits (1,797 8x8 images, 10 classes). Regenerate from the repository root:

    {cmd}

Semi-supervised split (stratified by class, seed {args.seed}):

| file | rows | columns | what |
|---|---|---|---|
| `digits/labeled.parquet` | {n_lab} | id, inputs, label | the only data the teachers trained on |
| `digits/unlabeled.parquet` | {n_unl} | id, inputs | the corpus soft labels are computed on |
| `digits/unlabeled_labels.parquet` | {n_unl} | id, label | held-out labels of the corpus, for measuring students |
| `digits/test.parquet` | {n_tst} | id, inputs, label | held-out test split |
| `teachers/digits_cnn_{{0,1,2}}.safetensors` | | | state_dicts of `softlabels.models:digits_cnn` |

`id` is `digits-NNNN` (the scikit-learn row index), `inputs` is `fixed_size_list<float32>[64]`
(values / 16, in [0, 1]), `label` is int64. Each teacher trained full-batch with AdamW
({args.steps} steps, lr {args.lr}, weight decay {args.weight_decay}, fp32, CPU) on `labeled.parquet`
with random 1-pixel shifts, with its own init and augmentation seed. Test accuracy: teachers {accs_txt};
ensemble (mean of probabilities) {ens_acc:.2%}. Teacher spec:
`softlabels.models:digits_cnn@data/teachers/digits_cnn_0.safetensors`. The student architecture
is `softlabels.models:digits_mlp`.
"""
    path = out / "README.md"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
