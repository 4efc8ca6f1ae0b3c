"""DistillationRecipe piece by piece: steps driven by hand equal train_student, load_checkpoint
rewinds exactly, one train_step equals a hand-written AdamW step, evaluate equals a dense numpy
computation, and a failing step leaves no signal handler or process group behind."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, classifier_table, run_cli, save_teacher, shard_paths, token_table, write_parquet
from failing_students import FAILURE, RAISE_AT
from softlabels.distributed import autocast
from softlabels.data import SoftLabelDataset
from softlabels.options import TrainConfig
from softlabels.train import DistillationRecipe, evaluate, train_student

STUDENT = "softlabels.models:digits_mlp"


def _generate(corpus: Path, teacher: str, out: Path, *extra: object) -> Path:
    result = run_cli("generate", corpus, "--out", out, "--teacher", teacher, "--id-column", "id", "--rows-per-shard", 25,
                     "--no-progress", *extra)
    assert result.code == 0, result.err
    return out


@pytest.fixture(scope="module")
def soft(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe")
    teacher = save_teacher("softlabels.models:digits_mlp", 0, root / "t.safetensors")
    unlabeled = write_parquet(classifier_table(117, seed=1).drop_columns(["label"]), root / "unlabeled.parquet")
    labeled = write_parquet(classifier_table(41, seed=2, first_id=500), root / "labeled.parquet")
    return {"unlabeled": _generate(unlabeled, teacher, root / "soft_unlabeled"),
            "labeled": _generate(labeled, teacher, root / "soft_labeled", "--label-column", "label")}


def _config(soft: dict[str, Path], out: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = dict(data=[soft["unlabeled"]], extra_data=[soft["labeled"]], mix="0.6,0.4", student=STUDENT,
                                    out=out, max_steps=11, batch_size=9, lr=3e-3, seed=5, log_every=1, progress=False)
    return TrainConfig(**{**settings, **overrides})


def _logged_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _steps(recipe: DistillationRecipe, count: int, log: bool = False) -> list[float]:
    losses = []
    for _ in range(count):
        terms = recipe.train_step(recipe.next_batch())
        if log:
            recipe.log_step(terms)
        losses.append(terms["loss"])
    return losses


def test_recipe_driven_by_hand_with_a_checkpoint_equals_train_student(tmp_path, soft):
    straight = train_student(_config(soft, tmp_path / "straight"))
    assert straight.steps == 11
    by_hand = tmp_path / "by_hand"
    first = DistillationRecipe(_config(soft, by_hand))
    try:
        first.setup()
        losses = _steps(first, 4)
        first.save_checkpoint()
    finally:
        first.cleanup()
    second = DistillationRecipe(_config(soft, by_hand, resume=True))
    try:
        second.setup()  # --resume: continues from the checkpoint
        assert second.step == 4
        losses += _steps(second, second.total_steps - second.step)
    finally:
        second.cleanup()
    assert [(step, loss) for step, loss in enumerate(losses, 1)] == _logged_losses(tmp_path / "straight")
    assert _equal(_weights(second.model), load_file(str(tmp_path / "straight" / "student.safetensors")))


def test_load_checkpoint_rewinds_weights_loaders_and_metrics(tmp_path, soft):
    recipe = DistillationRecipe(_config(soft, tmp_path / "run", max_steps=16))
    try:
        recipe.setup()
        _steps(recipe, 3, log=True)
        recipe.save_checkpoint()
        saved = _weights(recipe.model)
        ahead = _steps(recipe, 10, log=True)
        assert [source.epoch for source in recipe.sources] == [0, 1]  # the 41 labelled rows ran out: a new epoch
        ahead_weights = _weights(recipe.model)
        recipe.load_checkpoint()
        assert recipe.step == 3 and _equal(_weights(recipe.model), saved)
        assert [step for step, _ in _logged_losses(tmp_path / "run")] == [1, 2, 3]
        again = _steps(recipe, 10, log=True)
    finally:
        recipe.cleanup()
    assert again == ahead and _equal(_weights(recipe.model), ahead_weights)
    assert [loss for _, loss in _logged_losses(tmp_path / "run")][3:] == ahead


def test_train_step_equals_a_hand_written_adamw_step(tmp_path, soft):
    """One step on labelled rows: alpha * KD + (1 - alpha) * CE, clipped, AdamW at the warmup lr."""
    from softlabels import kd_loss

    config = TrainConfig(data=[soft["labeled"]], student=STUDENT, out=tmp_path / "run", max_steps=6, warmup_steps=4,
                         batch_size=13, lr=0.05, weight_decay=0.1, alpha=0.3, temperature=1.5, grad_clip=0.5, progress=False)
    recipe = DistillationRecipe(config)
    try:
        recipe.setup()
        batch = recipe.next_batch()
        twin = copy.deepcopy(recipe.model)  # the same weights, stepped by hand below
        terms = recipe.train_step(batch)
    finally:
        recipe.cleanup()
    optimizer = torch.optim.AdamW(twin.parameters(), lr=0.05 * 1 / 4, weight_decay=0.1)  # warmup: (step + 1) / 4
    logits = twin(batch["inputs"])  # [B, V]: one position per row
    kd = kd_loss(logits, batch["topk_ids"][:, 0], batch["topk_logprobs"][:, 0], temperature=1.5, tail="bucket")
    ce = torch.nn.functional.cross_entropy(logits, batch["labels"])
    loss = 0.3 * kd + 0.7 * ce
    loss.backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    optimizer.step()
    loss, kd, ce = loss.detach(), kd.detach(), ce.detach()
    assert terms["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert terms["kd"] == pytest.approx(float(kd), rel=1e-6) and terms["ce"] == pytest.approx(float(ce), rel=1e-6)
    assert terms["positions"] == len(batch["inputs"]) == 13
    for name, expected in twin.state_dict().items():
        torch.testing.assert_close(recipe.model.state_dict()[name], expected, rtol=1e-5, atol=1e-7)


def test_an_exception_in_a_step_restores_the_signal_handlers(tmp_path, soft):
    def ours(signum: int, frame: Any) -> None:
        """A handler of this test's own."""

    previous = {sig: signal.signal(sig, ours) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        config = TrainConfig(data=[soft["unlabeled"]], student="failing_students:raising_student", out=tmp_path / "run",
                             max_steps=8, batch_size=8, log_every=1, progress=False)
        with pytest.raises(RuntimeError, match=FAILURE):
            train_student(config)
        assert signal.getsignal(signal.SIGINT) is ours and signal.getsignal(signal.SIGTERM) is ours
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # the steps before the failure were logged; none reached --checkpoint-every (100)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert [step for step, _ in _logged_losses(tmp_path / "run")] == list(range(1, RAISE_AT))


def test_an_exception_in_a_step_under_torchrun_tears_down_every_rank(tmp_path, soft):
    """Two gloo ranks fail at the same step: both exit with the error, no hang, and each has its
    signal handlers back and no process group left."""
    reports = tmp_path / "reports"
    reports.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "failing_students", str(soft["unlabeled"]), str(tmp_path / "run"), str(reports)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    for rank in (0, 1):
        path = reports / f"rank-{rank}.json"
        assert path.is_file(), result.stderr[-3000:]
        report = json.loads(path.read_text())
        assert FAILURE in report["error"] and f"training forward {RAISE_AT}" in report["error"]
        assert report["sigint_restored"] and report["sigterm_restored"]
        assert report["group_initialized"] is False


# -- evaluate against a dense numpy computation ------------------------------------------------


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval")
    teacher = save_teacher("softlabels.models:token_gru", 3, root / "t.safetensors")
    corpus = write_parquet(token_table(29, seed=4), root / "c.parquet")
    soft = _generate(corpus, teacher, root / "soft", "--top-k", 5)
    from softlabels.models import token_gru

    student = token_gru()
    student.load_state_dict(load_file(teacher.partition("@")[2]))
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for parameter in student.parameters():  # near the teacher: top-1 agreement neither 0 nor 1
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return {"soft": soft, "student": student}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _kl(log_q: np.ndarray, log_s: np.ndarray) -> float:
    q = np.exp(log_q)
    return float(np.sum(np.where(q > 0, q * (log_q - log_s), 0.0)))


def _dense_kd(logits: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, temperature: float, tail: str) -> float:
    """DESIGN.md section 5 at one position, in float64: logits [V], ids and logprobs [k]."""
    vocab, k = len(logits), len(ids)
    log_s = _log_softmax(logits / temperature)
    tau = max(1.0 - float(np.exp(logprobs).sum()), 0.0)
    if tail == "uniform":
        teacher = np.full(vocab, tau / (vocab - k))
        teacher[ids] = np.exp(logprobs)
        with np.errstate(divide="ignore"):
            return _kl(_log_softmax(np.log(teacher) / temperature), log_s)
    others = np.ones(vocab, dtype=bool)
    others[ids] = False
    with np.errstate(divide="ignore"):
        bucket = math.log(vocab - k) + (math.log(tau) - math.log(vocab - k)) / temperature if tau > 0 else -math.inf
    log_q = _log_softmax(np.append(logprobs / temperature, bucket))
    student_tail = np.log(np.exp(log_s[others]).sum())
    return _kl(log_q, np.append(log_s[ids], student_tail))


@pytest.mark.parametrize("tail", ["uniform", "bucket"])
def test_evaluate_equals_a_dense_computation_over_ragged_rows(tmp_path, tokens, tail):
    temperature = 1.7
    config = TrainConfig(data=[tokens["soft"]], student="softlabels.models:token_gru", out=tmp_path / "unused",
                         temperature=temperature, tail=tail, progress=False)
    model = tokens["student"].train()
    dataset = SoftLabelDataset(tokens["soft"], batch_size=8, shuffle=False)  # 29 rows: 8, 8, 8, 5
    metrics = evaluate(model, dataset, config, torch.device("cpu"), next_token=True, precision=autocast(torch.device("cpu"), config.precision))
    assert model.training  # evaluate puts the mode back

    kd, agree, positions, correct, ce, labelled = [], 0, 0, 0, [], 0
    model.eval()
    for path in shard_paths(tokens["soft"]):  # the shards read directly, one row at a time, no padding
        table = pq.read_table(path).to_pydict()
        for inputs, ids, logprobs in zip(table["inputs"], table["topk_ids"], table["topk_logprobs"]):
            with torch.no_grad():
                x = torch.tensor([inputs])
                logits = model(x, torch.tensor([len(inputs)]))[0].double().numpy()  # [L, V]
            ids, logprobs = np.array(ids), np.array(logprobs, dtype=np.float64)
            for j in range(len(inputs)):
                kd.append(_dense_kd(logits[j], ids[j], logprobs[j], temperature, tail))
                agree += int(np.argmax(logits[j]) == ids[j][np.argmax(logprobs[j])])
                positions += 1
                if j + 1 < len(inputs):  # the next token is position j's hard label
                    correct += int(np.argmax(logits[j]) == inputs[j + 1])
                    ce.append(-_log_softmax(logits[j])[inputs[j + 1]])
                    labelled += 1
    model.train()
    assert 0 < agree < positions, (agree, positions)
    assert metrics["eval_kd"] == pytest.approx(temperature**2 * float(np.mean(kd)), rel=1e-5)
    assert metrics["eval_top1_agreement"] == pytest.approx(agree / positions, abs=1e-12)
    assert metrics["eval_accuracy"] == pytest.approx(correct / labelled, abs=1e-12)
    assert metrics["eval_ce"] == pytest.approx(float(np.mean(ce)), rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(float(np.mean(ce))), rel=1e-5)
