"""A synthetic high-entropy teacher, where the truth is known: which stored targets let a student recover it?

The teacher is a random linear softmax model over V classes on d-dimensional Gaussian inputs,
p(y | x) = softmax(W x + b), scaled so that its distributions are flat (high entropy, most of the mass
outside the top 12). Students of the same linear family start from zero and are trained with the
same steps, batch size and learning rate from targets computed once for a fixed training set, as
offline KD stores them:

* ``dense``: the full teacher distribution (the best any stored target can do);
* ``sample-N``: N ids drawn with replacement from the teacher per input, with the RS-KD loss
  (softlabels.targets.sampling, softlabels.losses, targets="sample"); ``sample-1`` is a hard label drawn from
  the teacher;
* ``topk-N-TAIL``: the teacher's N most probable ids with the ``bucket``, ``renorm`` or ``uniform``
  tail (softlabels.losses.kd_loss).

Each student is scored on held-out inputs by KL(teacher || student) at T=1 in nats (0 is the
teacher itself), with the students' mean entropy beside the teacher's (an over-confident student has
less). ``--student-dims 64,40`` (the default) makes one table for students of the teacher's own
family and one for students that see only the first 40 of the 64 input dimensions: students that
cannot represent the teacher, as in real distillation, where the targets' bias decides which
compromise the student settles on.

    python pipelines/synthetic_rskd.py [--seeds 0,1,2] [--steps 1500] [--temperature 1] [--student-dims 64,40] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from softlabels.losses import dense_kd_loss, kd_loss
from softlabels.targets.sampling import draw_targets, position_keys

__all__ = ["SyntheticConfig", "Teacher", "default_arms", "run_arms", "run_seed", "main"]

ID_BYTES, LOGPROB_BYTES, COUNT_BYTES = 2, 2, 1


@dataclass(frozen=True)
class SyntheticConfig:
    """One experiment. ``arms`` None means ``default_arms(samples)``."""

    dim: int = 64
    vocab: int = 200
    logit_scale: float = 1.5
    train: int = 8192
    held_out: int = 4096
    steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 0.02
    temperature: float = 1.0
    student_dims: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    samples: tuple[int, ...] = (12, 24)
    arms: tuple[str, ...] | None = None


def default_arms(samples: tuple[int, ...]) -> tuple[str, ...]:
    """dense, then per N: sampled and top-N with each tail (``sample-1``, a drawn hard label, on request)."""
    arms = ["dense"]
    for n in samples:
        arms += [f"sample-{n}", f"topk-{n}-bucket", f"topk-{n}-renorm", f"topk-{n}-uniform"]
    return tuple(arms)


@dataclass
class Teacher:
    """p(y | x) = softmax(x @ weight.T + bias): weight [V, d], bias [V]."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def random(cls, config: SyntheticConfig, generator: torch.Generator) -> Teacher:
        weight = torch.randn(config.vocab, config.dim, generator=generator) * config.logit_scale / math.sqrt(config.dim)
        return cls(weight, torch.randn(config.vocab, generator=generator) * 0.5)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs @ self.weight.T + self.bias


def _student_inputs(inputs: torch.Tensor, config: SyntheticConfig) -> torch.Tensor:
    return inputs if config.student_dims is None else inputs[:, : config.student_dims]


def _train(config: SyntheticConfig, inputs: torch.Tensor, loss_of, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam from zero weights, cosine decay to 0; ``loss_of(logits [b, V], rows [b])`` is the batch loss."""
    features = _student_inputs(inputs, config)
    weight = torch.zeros(config.vocab, features.shape[1], requires_grad=True)
    bias = torch.zeros(config.vocab, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    generator = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(config.steps):
        rows = torch.randint(0, len(inputs), (config.batch_size,), generator=generator)
        loss = loss_of(features[rows] @ weight.T + bias, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return weight.detach(), bias.detach()


def _kl_and_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> tuple[float, float]:
    log_p = torch.log_softmax(teacher_logits.double(), dim=-1)
    log_s = torch.log_softmax(student_logits.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_s)).sum(-1).mean()
    return float(kl), float(-(log_s.exp() * log_s).sum(-1).mean())


def run_seed(config: SyntheticConfig, seed: int) -> dict[str, dict[str, float]]:
    """Every arm on one teacher and data draw: {arm: {kl, entropy, bytes, distinct}}, plus ``teacher``."""
    generator = torch.Generator().manual_seed(seed)
    teacher = Teacher.random(config, generator)
    train_x = torch.randn(config.train, config.dim, generator=generator)
    held_x = torch.randn(config.held_out, config.dim, generator=generator)
    train_logits = teacher.logits(train_x)
    train_logprobs = torch.log_softmax(train_logits, dim=-1)
    held_logits = teacher.logits(held_x)
    temperature = config.temperature
    sample_ids = [f"synthetic#{i}" for i in range(config.train)]
    one_each = torch.ones(config.train, dtype=torch.int64)
    keys = position_keys(f"synthetic-rskd-seed-{seed}", sample_ids, one_each)

    results: dict[str, dict[str, float]] = {}
    log_p = torch.log_softmax(held_logits.double(), dim=-1)
    results["teacher"] = {"kl": 0.0, "entropy": float(-(log_p.exp() * log_p).sum(-1).mean()),
                          "bytes": float(config.vocab * LOGPROB_BYTES), "distinct": float(config.vocab),
                          "top_mass": {n: float(torch.topk(train_logprobs, n).values.exp().sum(-1).mean()) for n in config.samples}}
    for arm in config.arms or default_arms(config.samples):
        kind, _, rest = arm.partition("-")
        if kind == "dense":
            def loss_of(logits, rows):
                return dense_kd_loss(logits, train_logits[rows], temperature)
            size, distinct = config.vocab * LOGPROB_BYTES, config.vocab
        elif kind == "sample":
            n = int(rest)
            # the proposal is the teacher at the loss temperature, where the estimator is unbiased
            targets = draw_targets(train_logprobs, keys, n, proposal_temperature=temperature).padded()

            def loss_of(logits, rows, targets=targets):
                return kd_loss(logits, targets.ids[rows], targets.logprobs[rows], temperature, targets="sample",
                               sample_counts=targets.counts[rows], proposal_temperature=temperature,
                               proposal_log_normalizer=targets.log_normalizer[rows])
            distinct = float((targets.counts > 0).sum(-1).float().mean())
            size = distinct * (ID_BYTES + COUNT_BYTES + LOGPROB_BYTES)
        elif kind == "topk":
            n_text, _, tail = rest.partition("-")
            values, ids = torch.topk(train_logprobs, int(n_text), dim=-1)

            def loss_of(logits, rows, values=values, ids=ids, tail=tail):
                return kd_loss(logits, ids[rows], values[rows], temperature, tail)
            distinct = int(n_text)
            size = distinct * (ID_BYTES + LOGPROB_BYTES)
        else:
            raise ValueError(f"unknown arm {arm!r}")
        weight, bias = _train(config, train_x, loss_of, seed)
        kl, entropy = _kl_and_entropy(held_logits, _student_inputs(held_x, config) @ weight.T + bias)
        results[arm] = {"kl": kl, "entropy": entropy, "bytes": float(size), "distinct": float(distinct)}
    return results


def run_arms(config: SyntheticConfig) -> dict[str, list[float]]:
    """{arm: held-out KL(teacher || student) per seed}."""
    per_seed = [run_seed(config, seed) for seed in config.seeds]
    return {arm: [r[arm]["kl"] for r in per_seed] for arm in per_seed[0] if arm != "teacher"}


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def render(config: SyntheticConfig, per_seed: list[dict[str, dict[str, float]]], seconds: float) -> str:
    arms = [a for a in per_seed[0] if a != "teacher"]
    dense = [r["dense"]["kl"] for r in per_seed] if "dense" in arms else None
    teacher_entropy = statistics.mean(r["teacher"]["entropy"] for r in per_seed)
    masses = ", ".join(f"top-{n} {statistics.mean(r['teacher']['top_mass'][n] for r in per_seed):.3f}" for n in config.samples)
    student = "the same linear family" if config.student_dims is None else f"linear on the first {config.student_dims} of {config.dim} input dims"
    lines = [
        f"Synthetic teacher: linear softmax, V={config.vocab}, d={config.dim}, logit scale {config.logit_scale}; "
        f"mean entropy {teacher_entropy:.3f} nats (uniform: {math.log(config.vocab):.3f}); mean teacher mass in {masses}.",
        f"Students: {student}, zero init, Adam lr {config.learning_rate} with cosine decay, {config.steps} steps of {config.batch_size} "
        f"from {config.train} training inputs; loss temperature T={config.temperature:g} (sampled arms drawn at t=T); "
        f"held-out {config.held_out} inputs; seeds {', '.join(map(str, config.seeds))} (mean ± sd); {seconds:.0f} s.",
        "",
        "| arm | target bytes/position | distinct ids/position | held-out KL(teacher ‖ student), nats | minus dense | student entropy, nats |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm in arms:
        kl = [r[arm]["kl"] for r in per_seed]
        gap = _mean_sd([k - d for k, d in zip(kl, dense)]) if dense is not None else "-"
        lines.append(f"| {arm} | {statistics.mean(r[arm]['bytes'] for r in per_seed):.1f} | "
                     f"{statistics.mean(r[arm]['distinct'] for r in per_seed):.1f} | {_mean_sd(kl)} | {gap} | "
                     f"{_mean_sd([r[arm]['entropy'] for r in per_seed])} |")
    lines.append(f"| (teacher) | | | 0 | | {teacher_entropy:.4f} |")
    lines += ["", "Bytes per position before compression: top-N = N x (2-byte id + 2-byte log-prob); sampled = distinct ids x "
              "(2-byte id + 1-byte count + 2-byte log-prob); dense = V x 2."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=SyntheticConfig.steps)
    parser.add_argument("--train", type=int, default=SyntheticConfig.train)
    parser.add_argument("--samples", default="12,24")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--student-dims", default="64,40",
                        help="comma-separated: one table per student input size (64 = the teacher's family)")
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: every arm for --samples)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = SyntheticConfig(seeds=tuple(int(s) for s in args.seeds.split(",")), steps=args.steps, train=args.train,
                           samples=tuple(int(s) for s in args.samples.split(",")), temperature=args.temperature,
                           arms=None if args.arms is None else tuple(args.arms.split(",")))
    tables = []
    for dims in (int(d) for d in args.student_dims.split(",")):
        config = replace(base, student_dims=None if dims >= base.dim else dims)
        started = time.perf_counter()
        per_seed = [run_seed(config, seed) for seed in config.seeds]
        tables.append(render(config, per_seed, time.perf_counter() - started))
        print(tables[-1] + "\n", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
