"""Report stage of the speech pipeline: RUN/results.md from the files the other stages wrote.

Reads ``corpus/corpus.json``, ``targets/targets.json``, ``teacher/teacher.json``, every
``metrics.json`` (evaluate.py), the soft-label manifests and ``soft/<set>.timing.json``. Prints:

* per test set, phone error rate (PER) and frame senone error of the teacher and of each student arm
  (mean ± sd over seeds, sample sd), the relative PER reduction of (b) over (a) and the gap of (c) to
  (b) (from the means, and the mean ± sd of the per-seed paired figures);
* the issue's targets, met or missed, with the figures;
* bytes per frame and fidelity of the stored top-k, sizes and speeds, hours of audio per core-hour of
  ``generate``, and the million-hour plan recomputed from these per-frame figures.

    python pipelines/speech/report.py RUN_DIR > RUN_DIR/results.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ARMS = {"a": "(a) labeled only, hard labels", "b": "(b) labeled + unlabeled interleaved", "c": "(c) soft labels only"}
FRAME_SECONDS = 0.04
"""One output frame of the models: 4 frames of 10 ms."""


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def arm_metrics(run: Path) -> dict[str, dict[int, dict]]:
    """arm -> seed -> metrics.json of every evaluated student."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted((run / "students").glob("*-seed*/metrics.json")):
        arm, seed = path.parent.name.split("-seed")
        found.setdefault(arm, {})[int(seed)] = read(path)
    return found


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float], percent: bool = True) -> str:
    """'m ± sd' in percent (or as numbers); a single value alone."""
    m, sd = mean_sd(values)
    scale, unit = (100.0, "%") if percent else (1.0, "")
    return f"{m * scale:.2f}{unit}" if len(values) == 1 else f"{m * scale:.2f} ± {sd * scale:.2f}{unit}"


def per_of(arms: dict[str, dict[int, dict]], arm: str, test: str, key: str = "per") -> dict[int, float]:
    return {seed: record["sets"][test][key] for seed, record in arms.get(arm, {}).items() if test in record["sets"]}


def relative(base: dict[int, float], other: dict[int, float]) -> tuple[float | None, list[float]]:
    """(1 - mean(other) / mean(base), the per-seed paired 1 - other/base) over the seeds both have."""
    seeds = sorted(set(base) & set(other))
    if not seeds:
        return None, []
    means = 1 - statistics.fmean(other[s] for s in seeds) / statistics.fmean(base[s] for s in seeds)
    return means, [1 - other[s] / base[s] for s in seeds]


def results_table(run: Path, arms: dict[str, dict[int, dict]], teacher: dict, tests: list[str]) -> list[str]:
    lines = ["| test set | model | seeds | PER | frame senone error |", "|---|---|---|---|---|"]
    for test in tests:
        t = teacher["sets"][test]
        lines.append(f"| {test} | teacher | - | {t['per'] * 100:.2f}% | {t['frame_error'] * 100:.2f}% |")
        for arm, label in ARMS.items():
            per, frame = per_of(arms, arm, test), per_of(arms, arm, test, "frame_error")
            if per:
                lines.append(f"| {test} | {label} | {len(per)} | {cell(list(per.values()))} | {cell(list(frame.values()))} |")
    return lines


def comparison_table(arms: dict[str, dict[int, dict]], tests: list[str]) -> tuple[list[str], dict[str, dict]]:
    lines = ["| test set | PER reduction of (b) over (a): from means | paired per seed | PER of (c) over (b): from means | paired per seed |",
             "|---|---|---|---|---|"]
    figures: dict[str, dict] = {}
    for test in tests:
        a, b, c = (per_of(arms, arm, test) for arm in "abc")
        ba, ba_seeds = relative(a, b)
        cb, cb_seeds = relative(b, c)
        figures[test] = {"b_over_a": ba, "b_over_a_seeds": ba_seeds, "c_over_b": None if cb is None else -cb, "a": a, "b": b, "c": c}
        show = lambda value: "-" if value is None else f"{value * 100:+.1f}%"  # noqa: E731
        lines.append(f"| {test} | {show(ba)} | {cell(ba_seeds) if ba_seeds else '-'} | {show(None if cb is None else -cb)} | "
                     f"{cell([-x for x in cb_seeds]) if cb_seeds else '-'} |")
    return lines, figures


def apart(better: dict[int, float], worse: dict[int, float]) -> bool:
    """mean + sd of ``better`` below mean - sd of ``worse``."""
    if len(better) < 2 or len(worse) < 2:
        return False
    (mb, sb), (mw, sw) = mean_sd(list(better.values())), mean_sd(list(worse.values()))
    return mb + sb < mw - sw


def targets(figures: dict[str, dict]) -> list[str]:
    noisy, clean = figures.get("test_noisy"), figures.get("test_clean")
    if not noisy or noisy["b_over_a"] is None or not clean or clean["b_over_a"] is None:
        return ["- Targets: not enough arms evaluated to judge."]
    met = lambda ok: "**met**" if ok else "**missed**"  # noqa: E731
    ten = noisy["b_over_a"] >= 0.10
    more = noisy["b_over_a"] > clean["b_over_a"]
    sd_apart = apart(noisy["b"], noisy["a"])
    lines = [f"- (b) over (a), relative PER on test_noisy: {noisy['b_over_a'] * 100:+.1f}% (target >= 10%): {met(ten)}.",
             f"- ... and more there than on test_clean ({clean['b_over_a'] * 100:+.1f}%): {met(more)}.",
             f"- ... with the ± sd apart on test_noisy: {met(sd_apart)}."]
    for test in ("test_clean", "test_noisy"):
        gap = figures[test]["c_over_b"]
        if gap is not None:
            lines.append(f"- (c) within 10% of (b) on {test}: PER {gap * 100:+.1f}% relative: {met(gap <= 0.10)}.")
    return lines


def storage_lines(run: Path) -> list[str]:
    lines = ["| soft labels | utterances | frames | bytes per frame: soft labels / whole shard | captured top-k mass | KL(full ‖ stored) | generate: hours of audio per core-hour |",
             "|---|---|---|---|---|---|---|"]
    for name in ("labeled", "unlabeled"):
        manifest_path = run / "soft" / name / "manifest.json"
        if not manifest_path.is_file():
            continue
        manifest = read(manifest_path)
        totals, fidelity = manifest["totals"], manifest["fidelity"]
        speed = "-"
        timing_path = run / "soft" / f"{name}.timing.json"
        if timing_path.is_file() and not read(timing_path)["resumed"]:
            timing = read(timing_path)
            hours = float(sum(s["duration_s"] for s in _durations(run / "soft" / name))) / 3600
            speed = f"{hours / (timing['seconds'] * timing['cores'] / 3600):.1f} ({timing['seconds']:.0f} s on {timing['cores']} cores)"
        lines.append(f"| {name} | {totals['rows']:,} | {totals['positions']:,} | {totals['soft_label_bytes'] / totals['positions']:.1f} / "
                     f"{totals['bytes'] / totals['positions']:,.0f} | {fidelity['captured_mass_mean']:.4f} (p5 {fidelity['captured_mass_p5']:.3f}) | "
                     f"{fidelity['kl_full_vs_stored_mean']:.3f} nats | {speed} |")
    return lines


def _durations(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(folder / "data", columns=["duration_s"]).to_pylist()


def plan_lines(run: Path) -> list[str]:
    """The million-hour plan from the unlabeled run's per-frame figures."""
    path = run / "soft" / "unlabeled" / "manifest.json"
    timing_path = run / "soft" / "unlabeled.timing.json"
    if not path.is_file():
        return []
    totals = read(path)["totals"]
    per_frame = totals["soft_label_bytes"] / totals["positions"]
    frames = 1e6 * 3600 / FRAME_SECONDS
    lines = [f"- 1M hours at one frame per {FRAME_SECONDS * 1000:.0f} ms: {frames:.2e} frames; soft labels at "
             f"{per_frame:.1f} bytes per frame (top-{read(path)['top_k']}): **{frames * per_frame / 1e12:.1f} TB** "
             "(without the audio; the shards here also carry it)."]
    if timing_path.is_file() and not read(timing_path)["resumed"]:
        timing = read(timing_path)
        hours = float(sum(s["duration_s"] for s in _durations(run / "soft" / "unlabeled"))) / 3600
        per_core_hour = hours / (timing["seconds"] * timing["cores"] / 3600)
        lines.append(f"- Labelling 1M hours with this teacher on these CPUs: {1e6 / per_core_hour:,.0f} core-hours "
                     f"({per_core_hour:.0f} hours of audio per core-hour).")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    run = parser.parse_args(argv).run
    teacher = read(run / "teacher" / "metrics.json")
    arms = arm_metrics(run)
    tests = list(teacher["sets"])
    corpus, aligned = read(run / "corpus" / "corpus.json"), read(run / "targets" / "targets.json")
    out = ["# Speech: the million-hour setup in miniature", ""]
    out.append("Sets: " + ", ".join(f"{name} {s['utterances']:,} utterances ({s['hours']:.2f} h)" for name, s in corpus["sets"].items()) + ".")
    out.append("Alignment dropped: " + ", ".join(f"{name} {s['dropped']} of {s['aligned'] + s['dropped']}" for name, s in aligned["sets"].items()) + ".")
    out += ["", *results_table(run, arms, teacher, tests), ""]
    lines, figures = comparison_table(arms, tests)
    out += [*lines, "", *targets(figures), ""]
    sizes = ["| model | parameters | x real time (1 thread) |", "|---|---|---|",
             f"| teacher | {teacher['parameters']:,} | {teacher['x_real_time']:.0f} |"]
    student = next((r for seeds in arms.values() for r in seeds.values()), None)
    if student is not None:
        sizes.append(f"| student | {student['parameters']:,} ({teacher['parameters'] / student['parameters']:.1f}x smaller) | {student['x_real_time']:.0f} |")
    out += [*sizes, "", *storage_lines(run), "", *plan_lines(run)]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
