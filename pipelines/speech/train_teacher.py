"""Teacher stage of the speech pipeline: train the acoustic teacher by frame cross-entropy on the labeled set.

Reads ``TARGETS/labeled/part-*.parquet`` (build_targets.py: 16 kHz WAV bytes and 10 ms senones) and,
for the frame error printed after each epoch, ``TARGETS/test_clean``. Batches are rows of similar
length up to ``--batch-seconds`` of padded audio (softlabels.batching.length_batches), in an order
shuffled per epoch from ``--seed``; AdamW with linear warmup and cosine decay; gradient norm clipped at 1.

Writes ``OUT/teacher.safetensors`` and ``OUT/teacher.json`` (the SPEC, the settings, per-epoch loss and
frame error, the seconds of audio trained per second) last. After each epoch ``OUT/state.safetensors`` and
``OUT/state.json`` hold the weights, the optimizer's moments and the epoch, so an interrupted run
resumes at its last finished epoch with the same result as an uninterrupted one; a finished one is
skipped.

    python pipelines/speech/train_teacher.py --targets runs/speech/targets --out runs/speech/teacher --epochs 12
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from speech_models import frame_labels, teacher  # noqa: E402

IGNORE = -100


def load_set(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(float32 waveform in [-1, 1], int64 labels at the model's output frames) of every row of a target set."""
    import pyarrow.parquet as pq
    import soundfile as sf

    rows = []
    for shard in sorted(folder.glob("part-*.parquet")):
        for row in pq.read_table(shard, columns=["audio", "senones"]).to_pylist():
            samples, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
            if rate != 16_000:
                raise ValueError(f"{shard}: {rate} Hz audio, the teacher hears 16 kHz")
            rows.append((samples, frame_labels(np.asarray(row["senones"]), samples.size)))
    return rows


def batch_of(rows: list[tuple[np.ndarray, np.ndarray]], indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """waveforms float32 [B, S_max] zero-padded, lengths int64 [B], labels int64 [B, F_max] (IGNORE past each row's frames)."""
    longest = max(rows[i][0].size for i in indices)
    frames = max(rows[i][1].size for i in indices)
    waves = torch.zeros(len(indices), longest)
    labels = torch.full((len(indices), frames), IGNORE, dtype=torch.int64)
    for slot, i in enumerate(indices):
        waves[slot, : rows[i][0].size] = torch.from_numpy(rows[i][0])
        labels[slot, : rows[i][1].size] = torch.from_numpy(rows[i][1])
    return waves, torch.tensor([rows[i][0].size for i in indices]), labels


def batches(rows: list[tuple[np.ndarray, np.ndarray]], seconds: float) -> list[list[int]]:
    from softlabels.batching import length_batches

    return length_batches([w.size for w, _ in rows], cap=int(seconds * 16_000))


def frame_error(model: torch.nn.Module, rows: list[tuple[np.ndarray, np.ndarray]], seconds: float) -> float:
    """Share of output frames whose argmax is not the aligned senone."""
    wrong = total = 0
    model.eval()
    with torch.no_grad():
        for indices in batches(rows, seconds):
            waves, lengths, labels = batch_of(rows, indices)
            logits, _ = model(waves, lengths)
            valid = labels != IGNORE
            wrong += int((logits[:, : labels.shape[1]].argmax(-1) != labels)[valid].sum())
            total += int(valid.sum())
    model.train()
    return wrong / max(total, 1)


def save_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, record: dict) -> None:
    """Weights and AdamW moments (safetensors) and the record (JSON), each written whole then renamed."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optim.{index}.{k}": torch.as_tensor(v).contiguous() for k, v in state.items()})
    save_file(tensors, out / "state.safetensors.tmp")
    os.replace(out / "state.safetensors.tmp", out / "state.safetensors")
    (out / "state.json.tmp").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(out / "state.json.tmp", out / "state.json")


def load_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(out / "state.safetensors")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    saved = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    return json.loads((out / "state.json").read_text())


def schedule(total: int, warmup: int):  # noqa: ANN201 - a LambdaLR factor
    return lambda step: (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-seconds", type=float, default=60.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--halt-after", type=int, default=None, help="stop after this epoch's state is saved, as a preempted job would")
    args = parser.parse_args(argv)
    if (args.out / "teacher.json").is_file():
        print(f"{args.out}: trained already", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = load_set(args.targets / "labeled"), load_set(args.targets / "test_clean")
    if not train:
        print(f"error: {args.targets / 'labeled'}: no aligned utterances to train on", file=sys.stderr)
        return 1
    plan = batches(train, args.batch_seconds)
    torch.manual_seed(args.seed)
    model = teacher()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    total = args.epochs * len(plan)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(total, max(1, total // 20)))
    record = {"epochs": [], "seconds_of_audio": sum(w.size for w, _ in train) / 16_000, "utterances": len(train)}
    if (args.out / "state.json").is_file():
        record = load_state(args.out, model, optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(total, max(1, total // 20)), last_epoch=len(record["epochs"]) * len(plan) - 1)
    for epoch in range(len(record["epochs"]), args.epochs):
        started, loss_sum, frames = time.perf_counter(), 0.0, 0
        order = np.random.default_rng([args.seed, epoch]).permutation(len(plan))
        for b in order:
            waves, lengths, labels = batch_of(train, plan[b])
            logits, _ = model(waves, lengths)
            loss = torch.nn.functional.cross_entropy(logits[:, : labels.shape[1]].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            valid = int((labels != IGNORE).sum())
            loss_sum, frames = loss_sum + float(loss.detach()) * valid, frames + valid
        seconds = time.perf_counter() - started
        error = frame_error(model, test, args.batch_seconds) if test else float("nan")
        record["epochs"].append({"epoch": epoch, "loss": loss_sum / max(frames, 1), "test_clean_frame_error": error,
                                 "audio_seconds_per_second": record["seconds_of_audio"] / seconds})
        print(f"epoch {epoch}: loss {loss_sum / max(frames, 1):.4f}, test_clean frame error {error:.4f}, {seconds:.1f} s", file=sys.stderr, flush=True)
        save_state(args.out, model, optimizer, record)
        if args.halt_after is not None and epoch + 1 >= args.halt_after and epoch + 1 < args.epochs:
            print(f"{args.out}: halted after epoch {epoch} (--halt-after); rerun to continue", file=sys.stderr)
            return 0
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / "teacher.safetensors")
    record.update({"spec": f"speech_models:teacher@{args.out / 'teacher.safetensors'}", "parameters": sum(p.numel() for p in model.parameters()),
                   "settings": {"epochs": args.epochs, "batch_seconds": args.batch_seconds, "lr": args.lr, "seed": args.seed}})
    (args.out / "teacher.json.tmp").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(args.out / "teacher.json.tmp", args.out / "teacher.json")
    for name in ("state.safetensors", "state.json"):
        (args.out / name).unlink(missing_ok=True)
    print(f"{args.out}: teacher trained, test_clean frame error {record['epochs'][-1]['test_clean_frame_error']:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
