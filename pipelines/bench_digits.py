"""Semi-supervised distillation on the embedded digits data: does the ensemble's soft labels help?

The three teachers (small CNNs) saw only the 150 rows of data/digits/labeled.parquet. The student (the
digits_mlp MLP, freshly initialised) is trained with the same budget of steps, batch size
and learning rate in each arm:

* hard:     cross-entropy on the 150 labeled rows only (alpha = 0);
* kd:       KD on the soft labels of the 1,247 unlabeled rows only (alpha = 1);
* kd+hard:  the unlabeled soft labels mixed 0.7 / 0.3 with the labeled rows (KD everywhere,
            CE where a label exists, alpha = 0.5), the million-hour setup in miniature.

Test accuracy is measured on the 400 held-out rows of data/digits/test.parquet, over several seeds.

    python pipelines/bench_digits.py [--steps 1000] [--seeds 0,1,2] [--out runs/bench_digits]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHERS = [f"softlabels.models:digits_cnn@{REPO}/data/teachers/digits_cnn_{i}.safetensors" for i in range(3)]


def softlabels(*args: object) -> str:
    command = [sys.executable, "-m", "softlabels.cli", *[str(a) for a in args]]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return result.stdout


def generate(corpus: Path, out: Path, *extra: object) -> Path:
    teachers = [arg for spec in TEACHERS for arg in ("--teacher", spec)]
    softlabels("generate", corpus, "--id-column", "id", "--out", out, "--no-progress", *teachers, *extra)
    return out


def final_eval(out: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_kd" in r][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_digits")
    args = parser.parse_args()
    data = REPO / "data" / "digits"
    soft_unlabeled = generate(data / "unlabeled.parquet", args.out / "soft_unlabeled")
    soft_labeled = generate(data / "labeled.parquet", args.out / "soft_labeled", "--label-column", "label")
    soft_test = generate(data / "test.parquet", args.out / "soft_test", "--label-column", "label")
    arms = {
        "hard labels only (150 labeled rows)": [soft_labeled, "--alpha", 0.0],
        "KD on unlabeled soft labels (1,247 rows)": [soft_unlabeled, "--alpha", 1.0],
        "KD + hard, unlabeled 0.7 / labeled 0.3": [soft_unlabeled, "--data", soft_labeled, "--mix", "0.7,0.3", "--alpha", 0.5],
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for index, (name, arm) in enumerate(arms.items()):
            out = args.out / f"arm{index}_seed{seed}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            softlabels("train-student", *arm, "--student", "softlabels.models:digits_mlp", "--out", out,
                       "--max-steps", args.steps, "--batch-size", 32, "--lr", 3e-3, "--seed", seed,
                       "--eval", soft_test, "--no-progress", "--checkpoint-every", args.steps)
            results[name].append(final_eval(out))
    teacher = json.loads((soft_test / "manifest.json").read_text())
    print(f"Student: digits_mlp, {args.steps} steps of batch 32, lr 3e-3, T=2; test = 400 held-out digits; "
          f"seeds {args.seeds}. Teachers: 3 x digits_cnn trained on the 150 labeled rows ({teacher['ensemble']} ensemble).\n")
    print("| student trained on | test accuracy (mean ± sd) | top-1 agreement with ensemble |")
    print("|---|---|---|")
    summary = {}
    for name, runs in results.items():
        accuracy = [r["eval_accuracy"] for r in runs]
        agreement = [r["eval_top1_agreement"] for r in runs]
        sd = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
        print(f"| {name} | {statistics.mean(accuracy):.4f} ± {sd:.4f} | {statistics.mean(agreement):.4f} |")
        summary[name] = {"accuracy": accuracy, "agreement": agreement}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
