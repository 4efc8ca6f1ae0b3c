"""Performance benchmark of ``softlabels generate``: pipeline overhead, bytes per position, peak RSS.

Three figures, each measured as a ratio or a size inside one run (the machines are small and shared,
so absolute times are noise; ratios of interleaved runs much less so):

1. Pipeline overhead: wall time of ``softlabels.generate.generate`` divided by the wall time of the
   bare teacher forward over the same batches, in the same process with the same torch threads.
   The teacher (``lm_full``) is an LLM-shaped token model with a 32,000-token vocabulary over ragged
   sequences of 64-256 tokens, sized so that its forward should dominate the work. The bare forward
   loads it the same way (``softlabels.teachers.load_teacher``), builds the same batches (units cut
   the same way and never sharing a batch; ``softlabels.inputs.to_teacher_inputs``), converts them
   to tensors before the clock starts, and calls it under ``torch.inference_mode``. Bare and
   generate alternate (bare, generate, bare, generate, ...); the median of the per-pair ratios is
   the figure. Target: <= 1.10. One more generate run on the same data, with timers wrapped around
   the functions ``softlabels.generate`` calls, attributes its wall time to pipeline stages.
2. Bytes per position at k=20 with uint16 ids and the default ``--logprob-dtype`` (bfloat16; raw
   payload 20 x (2 + 2) = 80 bytes): total shard bytes (sample ids, the passed-through input column,
   statistics and Parquet overhead included) and soft-label bytes (compressed ``topk_ids`` + the
   log-prob column chunks), per position:
   (a) from the overhead runs above (small shards, as cut for timing);
   (b) from generate runs at a realistic shard size (default --rows-per-shard, tens of thousands of
       positions per shard) with a cheap V=32,000 teacher (``lm_bytes``, the output layer alone);
   (c) a 1,000-class classifier (one position per row).
   (b) and (c) each run twice: a randomly initialised teacher (near-uniform outputs: ids are
   uniformly random, the worst case for compression) and a "peaked" one whose output layer is scaled
   so that the mean top-1 probability is about 0.5.
3. Peak RSS does not grow with corpus size: ``softlabels generate`` (``softlabels.cli.main``) in a
   child process on a 1x and a 10x corpus (same --rows-per-shard and --batch-size, --id-column on).
   The child reports its peak RSS after the run and after its imports. The figure is VmHWM from
   /proc/self/status: ``ru_maxrss`` is also recorded but on Linux it carries over the parent's RSS
   at fork time through exec, so a child of this (large) process would report the parent's size.
   Both corpora are cut into many units (10 and 100): a unit's transient peak (the batch logits and
   the top-k temporaries, and whatever the reader and writer threads hold at that moment) varies
   from unit to unit, so a 1x corpus of two units would compare the largest of two samples with
   the largest of twenty. Target: 10x within 10% of 1x.

Everything (corpora, teachers saved as safetensors with fixed seeds, outputs) is built under --out
(default ``runs/bench``, git-ignored). Prints a markdown table and the exact command, and writes
``results-full.json`` (or ``results-quick.json``) there.

Run from the repository root:

    python pipelines/bench_generate.py            # full size, about 2.5-3.5 minutes on 2 busy cores
    python pipelines/bench_generate.py --quick    # smoke version, about 20-30 s

The teacher factories live in this module; ``softlabels generate`` loads them as
``bench_generate:lm_full@WEIGHTS`` with ``pipelines/`` on ``sys.path`` (the script puts it there for
its in-process runs and on ``PYTHONPATH`` for the child processes).
"""

from __future__ import annotations

import importlib
import argparse
import functools
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODULE = "bench_generate"  # the module name the library imports the factories under
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:  # a checkout without `pip install -e .`
    sys.path.insert(1, str(REPO))

LM_VOCAB = 32000
CLASSIFIER_CLASSES = 1000
CLASSIFIER_FEATURES = 64
RSS_VOCAB = 8192
TOP_K = 20
RAW_BYTES = TOP_K * (2 + 2)  # uint16 id + 2-byte (bfloat16 or float16) log-prob per stored class
PEAKED_TOP1 = 0.5


# ----------------------------------------------------------------------------------------------
# Teachers: factories importable as bench_generate:NAME
# ----------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """Pre-norm MLP block with a residual: x + W2 gelu(W1 norm(x))."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class BenchLM(nn.Module):
    """An LLM-shaped causal token model.

    Embedding(V, embed) -> Linear(embed, width) -> causal running mean over positions -> ``layers``
    pre-norm MLP blocks (width -> 4 width -> width) -> LayerNorm -> Linear(width, V). Per position
    about 2 x (8 layers + 1) x width^2 + 2 x width x V FLOPs: for ``lm_full`` (width 1024, 4 layers,
    V = 32,000) 134 MFLOP, half of it in the output layer (SmolLM2-135M: about 270 MFLOP per token,
    a fifth in its output layer). Called as ``model(x, lengths)`` with x int64 [B, T]; returns
    logits [B, T, V]. Causal, so right padding never changes a valid position.
    """

    def __init__(self, vocab: int = LM_VOCAB, width: int = 1024, layers: int = 4, embed: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.proj = nn.Linear(embed, width)
        self.blocks = nn.ModuleList(_Block(width, 4 * width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.embed(x))
        steps = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)
        h = h + torch.cumsum(h, dim=1) / steps[None, :, None]
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BenchClassifier(nn.Module):
    """MLP classifier: Linear(64, 256) - GELU - Linear(256, 1000)."""

    def __init__(self, features: int = CLASSIFIER_FEATURES, hidden: int = 256, classes: int = CLASSIFIER_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.GELU())
        self.head = nn.Linear(hidden, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def lm_full() -> nn.Module:
    """The overhead teacher: width 1024, 8 blocks, V = 32,000 (104M parameters, near SmolLM2-135M)."""
    return BenchLM(LM_VOCAB, width=1024, layers=8)


def lm_quick() -> nn.Module:
    """The overhead teacher for --quick: width 384, 1 block, V = 32,000 (18M parameters)."""
    return BenchLM(LM_VOCAB, width=384, layers=1)


def lm_bytes() -> nn.Module:
    """A cheap V = 32,000 token model (no blocks) for the bytes-per-position runs."""
    return BenchLM(LM_VOCAB, width=64, layers=0, embed=32)


def lm_rss() -> nn.Module:
    """A small token model for the RSS runs, whose cost should be corpus size, not the teacher."""
    return BenchLM(RSS_VOCAB, width=64, layers=0, embed=32)


def classifier() -> nn.Module:
    return BenchClassifier()


# ----------------------------------------------------------------------------------------------
# Sizes, corpora and teacher files
# ----------------------------------------------------------------------------------------------


@dataclass
class Size:
    lm_factory: str
    lm_rows: int                # overhead corpus: rows of 64-256 tokens
    batch_size: int
    rows_per_shard: int
    pairs: int                  # (bare, generate) repetitions
    bytes_rows: int             # bytes corpus: rows of 64-256 tokens, one shard
    classifier_rows: int
    rss_rows: int               # 1x RSS corpus: rows of 8-32 tokens; the 10x corpus has 10 times as many
    rss_batch_size: int
    rss_rows_per_shard: int


FULL = Size("lm_full", lm_rows=96, batch_size=8, rows_per_shard=16, pairs=3, bytes_rows=96,
            classifier_rows=20000, rss_rows=160, rss_batch_size=16, rss_rows_per_shard=16)
QUICK = Size("lm_quick", lm_rows=4, batch_size=2, rows_per_shard=2, pairs=3, bytes_rows=8,
             classifier_rows=1000, rss_rows=32, rss_batch_size=8, rss_rows_per_shard=8)
LM_LENGTHS = (64, 256)
RSS_LENGTHS = (8, 32)


def token_table(rows: int, vocab: int, lengths: tuple[int, int], seed: int, with_id: bool) -> pa.Table:
    """Ragged sequences of uniformly random tokens, list<int32> (a common on-disk token type)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(lengths[0], lengths[1] + 1, rows)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    tokens = rng.integers(0, vocab, int(counts.sum()), dtype=np.int32)
    columns: dict[str, pa.Array] = {}
    if with_id:
        columns["id"] = pa.array([f"doc-{i:08d}" for i in range(rows)])
    columns["inputs"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens))
    return pa.table(columns)


def classifier_table(rows: int, seed: int) -> pa.Table:
    """64 uniformly random float32 features per row (incompressible: they dominate total bytes)."""
    rng = np.random.default_rng(seed)
    values = rng.random((rows, CLASSIFIER_FEATURES), dtype=np.float32)
    return pa.table({"inputs": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), CLASSIFIER_FEATURES)})


def write_corpus(table: pa.Table, path: Path) -> Path:
    """Written as a user would, with pyarrow's defaults."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _mean_top1(logits: torch.Tensor) -> float:
    return float(torch.softmax(logits.float(), dim=-1).amax(dim=-1).mean())


def _sample_inputs(table: pa.Table, rows: int) -> tuple[torch.Tensor, ...]:
    from softlabels.inputs import to_teacher_inputs

    part = table.slice(0, rows)
    inputs = to_teacher_inputs(part.column("inputs"), "inputs", pa.array([str(i) for i in range(part.num_rows)]))
    return (inputs.x,) if inputs.lengths is None else (inputs.x, inputs.lengths)


def save_teacher(factory: str, seed: int, path: Path, sample: tuple[torch.Tensor, ...], peaked: bool) -> dict[str, Any]:
    """Initialise ``factory`` with ``seed`` and save it as safetensors.

    With ``peaked``, the output layer (weight and bias) is first scaled so that the mean top-1
    probability over ``sample`` is about ``PEAKED_TOP1``; otherwise the random init is kept, whose
    outputs are close to uniform.
    """
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = globals()[factory]().eval()
    info: dict[str, Any] = {"factory": factory, "seed": seed, "scale": 1.0, "peaked": peaked}
    with torch.inference_mode():
        if peaked:
            base = model.head(model.features(sample[0]).reshape(-1, model.head.in_features)[:256])
            low, high = 0.0, 8.0  # bisect log2(scale): the top-1 probability grows with the scale
            for _ in range(16):
                mid = (low + high) / 2
                low, high = (mid, high) if _mean_top1(base * 2.0**mid) < PEAKED_TOP1 else (low, mid)
            scale = 2.0 ** ((low + high) / 2)
            model.head.weight.mul_(scale)
            model.head.bias.mul_(scale)
            info["scale"] = scale
        info["mean_top1"] = _mean_top1(model(*sample).reshape(-1, model.head.out_features)[:2048])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    info["spec"] = f"{MODULE}:{factory}@{path}"
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return info


# ----------------------------------------------------------------------------------------------
# Timed runs
# ----------------------------------------------------------------------------------------------


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class Timing:
    wall: float
    cpu: float      # process CPU seconds, all threads
    faults: int     # minor page faults, whole process


def _timed(fn: Callable[[], Any]) -> tuple[Timing, Any]:
    f0, c0, t0 = _minflt(), time.process_time(), time.perf_counter()
    result = fn()
    t1, c1, f1 = time.perf_counter(), time.process_time(), _minflt()
    return Timing(t1 - t0, c1 - c0, f1 - f0), result


def build_batches(corpus_path: Path, batch_size: int, rows_per_shard: int) -> list[Any]:
    """The batches generate calls the teacher with: units cut the same way, never sharing a batch."""
    from softlabels.corpus import open_corpus
    from softlabels.inputs import to_teacher_inputs

    corpus = open_corpus([str(corpus_path)], "inputs", id_column=None, label_column=None, rows_per_shard=rows_per_shard)
    batches = []
    for unit in corpus.units:
        table = corpus.read_unit(unit)
        for begin in range(0, table.num_rows, batch_size):
            batch = table.slice(begin, batch_size)
            batches.append(to_teacher_inputs(batch.column("inputs"), "inputs", batch.column("sample_id").combine_chunks()))
    return batches


def bare_forward(teacher: Any, batches: list[Any]) -> int:
    """The teacher alone over pre-built batches; returns the number of valid positions."""
    positions = 0
    with torch.inference_mode():
        for inputs in batches:
            logits = teacher.logits(inputs)
            positions += int(inputs.lengths.sum()) if inputs.lengths is not None else len(inputs.x)
            del logits
    return positions


def run_generate(corpus_path: Path, spec: str, out: Path, batch_size: int, rows_per_shard: int) -> Any:
    from softlabels.generate import GenerateConfig, generate

    shutil.rmtree(out, ignore_errors=True)
    config = GenerateConfig(
        corpus=[str(corpus_path)], teachers=[spec], out=out, top_k=TOP_K, batch_size=batch_size,
        rows_per_shard=rows_per_shard, device="cpu", progress=False,
    )
    return generate(config)


def bytes_record(out: Path) -> dict[str, Any]:
    """Sizes of a sealed run from its manifest and the shards' Parquet footers."""
    from softlabels.rundir import RunDirectory
    from softlabels.targets import soft_columns

    directory = RunDirectory.open(out)
    manifest = directory.read_sealed()
    ids_column, logprob_column = soft_columns(manifest)
    totals = manifest["totals"]
    positions = max(int(totals["positions"]), 1)
    columns: dict[str, int] = {}
    encodings: dict[str, list[str]] = {}
    shards = [Path(str(shard)) for shard in directory.shard_files()]  # local disk: plain paths for pyarrow
    row_groups = 0
    for shard in shards:
        metadata = pq.read_metadata(shard)
        row_groups += metadata.num_row_groups
        for group in range(metadata.num_row_groups):
            for index in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(index)
                top = chunk.path_in_schema.split(".")[0]
                columns[top] = columns.get(top, 0) + chunk.total_compressed_size
                encodings.setdefault(top, sorted(chunk.encodings))
    schema = pq.read_schema(shards[0])
    soft = int(totals.get("soft_label_bytes", columns.get(ids_column, 0) + columns.get(logprob_column, 0)))
    return {
        "rows": int(totals["rows"]),
        "positions": int(totals["positions"]),
        "shards": len(shards),
        "row_groups": row_groups,
        "positions_per_shard": totals["positions"] / max(len(shards), 1),
        "bytes": int(totals["bytes"]),
        "soft_label_bytes": soft,
        "bytes_per_position": totals["bytes"] / positions,
        "soft_label_bytes_per_position": soft / positions,
        "column_bytes_per_position": {name: size / positions for name, size in columns.items()},
        "encodings": encodings,
        "id_type": str(schema.field(ids_column).type.value_type.value_type),
        "logprob_column": logprob_column,
        "logprob_type": manifest.get("logprob_dtype", "float16"),  # the codec: a bfloat16 column is float32 in Arrow
        "logprob_arrow_type": str(schema.field(logprob_column).type.value_type.value_type).replace("halffloat", "float16"),
        "captured_mass": float(totals.get("captured_mass_mean", float("nan"))),
    }


class StageClock:
    """Times functions that ``softlabels.generate`` calls through module globals.

    Each wrapped function adds its wall seconds, calls and the process's minor page faults while it
    ran (process-wide, so concurrent threads blur that column) to a (thread, stage) slot. Names the
    library no longer has are skipped, so the benchmark survives refactors; ``undo`` restores them.
    """

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[float]] = {}
        self.lock = threading.Lock()
        self.restore: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            f0, t0 = _minflt(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                dt, df = time.perf_counter() - t0, _minflt() - f0
                thread = threading.current_thread().name
                group = "main" if thread == "MainThread" else thread.rsplit("_", 1)[0]
                with self.lock:
                    slot = self.records.setdefault((group, stage), [0.0, 0, 0])
                    slot[0] += dt
                    slot[1] += df
                    slot[2] += 1

        setattr(owner, name, timed)
        self.restore.append((owner, name, original))

    def undo(self) -> None:
        for owner, name, original in reversed(self.restore):
            setattr(owner, name, original)
        self.restore.clear()


STARTUP = "startup: open corpus, load + hash teacher, probe"
PROCESS_UNIT = "process_unit (a unit's batches: everything below)"
INNER = ("convert batch (Arrow -> padded tensor)", "teacher forward", "valid_positions (gather unpadded logits)",
         "soft_labels (top-k, log-sum-exp, entropy, NaN/Inf check)")


def instrumented_generate(corpus_path: Path, spec: str, out: Path, batch_size: int, rows_per_shard: int) -> dict[str, Any]:
    import softlabels.corpus as corpus_module
    import softlabels.inputs as inputs_module
    gen = importlib.import_module("softlabels.generate")  # softlabels.generate is the function
    import softlabels.pipeline as pipe

    clock = StageClock()
    for owner, name, stage in (
        (gen, "_prepare", STARTUP),
        (corpus_module.Corpus, "read_unit", "read unit (Parquet -> Arrow)"),
        (inputs_module, "to_teacher_inputs", INNER[0]),
        (pipe, "forward", INNER[1]),
        (pipe, "valid_positions", INNER[2]),
        (pipe, "soft_labels", INNER[3]),
        (pipe, "build_shard", "build_shard (Arrow table)"),
        (pipe, "write_shard", "write_shard (zstd Parquet in _staging, fsync, sha256, rename into data/)"),
        (pipe, "process_unit", PROCESS_UNIT),
        (pipe, "write_unit", "write_unit (a shard: build and write; the journal line follows)"),
    ):
        clock.wrap(owner, name, stage)
    try:
        timing, summary = _timed(lambda: run_generate(corpus_path, spec, out, batch_size, rows_per_shard))
    finally:
        clock.undo()
    rows = [{"thread": g, "stage": s, "seconds": r[0], "minor_faults": r[1], "calls": r[2]} for (g, s), r in clock.records.items()]
    seconds = {(g, s): r[0] for (g, s), r in clock.records.items()}
    faults = {(g, s): r[1] for (g, s), r in clock.records.items()}
    if ("main", PROCESS_UNIT) in seconds:
        rows.append({
            "thread": "main", "stage": "rest of process_unit (.cpu().numpy(), bookkeeping)",
            "seconds": seconds["main", PROCESS_UNIT] - sum(seconds.get(("main", s), 0.0) for s in INNER),
            "minor_faults": faults["main", PROCESS_UNIT] - sum(faults.get(("main", s), 0) for s in INNER),
            "calls": clock.records["main", PROCESS_UNIT][2],
        })
        rows.append({
            "thread": "main", "stage": "the rest: waiting on reader/writer, manifest",
            "seconds": timing.wall - seconds["main", PROCESS_UNIT] - seconds.get(("main", STARTUP), 0.0),
            "minor_faults": 0, "calls": 1,
        })
    return {"wall": timing.wall, "cpu": timing.cpu, "faults": timing.faults, "positions": int(summary.positions), "stages": rows}


# ----------------------------------------------------------------------------------------------
# Peak RSS in a child process
# ----------------------------------------------------------------------------------------------

RSS_CHILD = """
import json, resource, sys, threading, time

def status_kb(key):
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

import torch, softlabels.generate
from softlabels.cli import main
baseline = status_kb('VmHWM')
samples, stop = [], threading.Event()

def sample():  # RSS every 10 ms, to tell growth over the run from unit-to-unit fluctuation
    while not stop.wait(0.01):
        samples.append((time.perf_counter(), status_kb('VmRSS')))

sampler = threading.Thread(target=sample, daemon=True)
started = time.perf_counter()
sampler.start()
code = main(sys.argv[1:])
stop.set()
sampler.join()
span = max(time.perf_counter() - started, 1e-9)
tenths = [0] * 10
for at, kb in samples:
    slot = min(int((at - started) / span * 10), 9)
    tenths[slot] = max(tenths[slot], kb)
print('BENCH-RSS ' + json.dumps({'code': code, 'peak_kb': status_kb('VmHWM'), 'baseline_kb': baseline,
      'ru_maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'sampled_peak_kb_by_tenth': tenths}))
"""


def rss_run(corpus_path: Path, spec: str, out: Path, batch_size: int, rows_per_shard: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    args = [
        "generate", str(corpus_path), "--teacher", spec, "--out", str(out), "--id-column", "id",
        "--top-k", str(TOP_K), "--batch-size", str(batch_size), "--rows-per-shard", str(rows_per_shard),
        "--device", "cpu", "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, *args], capture_output=True, text=True, env=env, timeout=1800)
    seconds = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH-RSS ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"RSS child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    record = json.loads(lines[-1][len("BENCH-RSS "):])
    if record["code"] != 0:
        raise RuntimeError(f"softlabels generate exited {record['code']}:\n{proc.stderr}")
    from softlabels.rundir import RunDirectory

    totals = RunDirectory.open(out).read_sealed()["totals"]
    record.update(seconds=seconds, rows=totals["rows"], positions=totals["positions"], shards=totals["shards"])
    return record


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (about 20-30 s)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench", help="work and results folder (default runs/bench)")
    parser.add_argument("--pairs", type=int, default=None, help="(bare, generate) repetitions (default 3)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    pairs = args.pairs or size.pairs
    mode = "quick" if args.quick else "full"
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    started = time.perf_counter()
    sections: dict[str, float] = {}
    load_start = os.getloadavg()
    work = args.out / mode
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    log(f"building corpora and teachers under {work}")
    lm_table = token_table(size.lm_rows, LM_VOCAB, LM_LENGTHS, seed=1, with_id=False)
    lm_corpus = write_corpus(lm_table, work / "corpus" / "lm" / "tokens.parquet")
    bytes_table = token_table(size.bytes_rows, LM_VOCAB, LM_LENGTHS, seed=2, with_id=False)
    bytes_corpus = write_corpus(bytes_table, work / "corpus" / "bytes" / "tokens.parquet")
    cls_table = classifier_table(size.classifier_rows, seed=3)
    cls_corpus = write_corpus(cls_table, work / "corpus" / "classifier" / "inputs.parquet")
    rss_tables = {f: token_table(f * size.rss_rows, RSS_VOCAB, RSS_LENGTHS, seed=4, with_id=True) for f in (1, 10)}
    rss_corpora = {f: write_corpus(t, work / "corpus" / f"rss-{f}x" / "tokens.parquet") for f, t in rss_tables.items()}

    lm_sample = _sample_inputs(lm_table, 4)
    bytes_sample = _sample_inputs(bytes_table, 8)
    cls_sample = _sample_inputs(cls_table, 2048)
    teachers_dir = work / "teachers"
    teachers = {
        "lm": save_teacher(size.lm_factory, 10, teachers_dir / "lm.safetensors", lm_sample, peaked=True),
        "lm_bytes_peaked": save_teacher("lm_bytes", 11, teachers_dir / "lm_bytes_peaked.safetensors", bytes_sample, peaked=True),
        "lm_bytes_uniform": save_teacher("lm_bytes", 12, teachers_dir / "lm_bytes_uniform.safetensors", bytes_sample, peaked=False),
        "cls_peaked": save_teacher("classifier", 20, teachers_dir / "cls_peaked.safetensors", cls_sample, peaked=True),
        "cls_uniform": save_teacher("classifier", 21, teachers_dir / "cls_uniform.safetensors", cls_sample, peaked=False),
        "rss": save_teacher("lm_rss", 30, teachers_dir / "rss.safetensors", _sample_inputs(rss_tables[1], 4), peaked=False),
    }
    sections["setup"] = time.perf_counter() - started

    # -- 1. overhead: bare forward and generate, alternating; then one instrumented generate
    from softlabels.teachers import load_teacher

    section = time.perf_counter()
    spec = teachers["lm"]["spec"]
    teacher = load_teacher(spec, torch.device("cpu"))
    batches = build_batches(lm_corpus, size.batch_size, size.rows_per_shard)
    threads = torch.get_num_threads()
    log(f"overhead: {pairs} x (bare forward, generate), {size.lm_factory}, {size.lm_rows} rows, {len(batches)} batches")
    with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
        teacher.logits(batches[0])
    bare_runs: list[Timing] = []
    gen_runs: list[Timing] = []
    positions = 0
    for rep in range(pairs):
        bare, positions = _timed(functools.partial(bare_forward, teacher, batches))
        gen, summary = _timed(lambda: run_generate(lm_corpus, spec, work / "out" / "lm", size.batch_size, size.rows_per_shard))
        bare_runs.append(bare)
        gen_runs.append(gen)
        if summary.positions != positions:
            raise RuntimeError(f"generate saw {summary.positions} positions, the bare forward {positions}")
        log(f"  pair {rep + 1}: bare {bare.wall:.2f} s, generate {gen.wall:.2f} s, ratio {gen.wall / bare.wall:.3f}")
    batch_count = len(batches)
    del teacher, batches
    log("instrumented generate (same teacher and corpus)")
    breakdown = instrumented_generate(lm_corpus, spec, work / "out" / "lm-instrumented", size.batch_size, size.rows_per_shard)
    wall_ratios = [g.wall / b.wall for b, g in zip(bare_runs, gen_runs)]
    bare_wall = statistics.median(b.wall for b in bare_runs)
    gen_wall = statistics.median(g.wall for g in gen_runs)
    overhead = {
        "teacher": teachers["lm"], "rows": size.lm_rows, "positions": positions, "batches": batch_count,
        "batch_size": size.batch_size, "rows_per_shard": size.rows_per_shard, "torch_threads": threads,
        "bare": [vars(b) for b in bare_runs], "generate": [vars(g) for g in gen_runs],
        "wall_ratios": wall_ratios, "wall_ratio_median": statistics.median(wall_ratios),
        "cpu_ratio_median": statistics.median(g.cpu / b.cpu for b, g in zip(bare_runs, gen_runs)),
        "best_wall_ratio": min(g.wall for g in gen_runs) / min(b.wall for b in bare_runs),
        "bare_us_per_position": bare_wall / positions * 1e6,
        "generate_us_per_position": gen_wall / positions * 1e6,
        "overhead_us_per_position": (gen_wall - bare_wall) / positions * 1e6,
        "bare_faults_per_position": statistics.median(b.faults for b in bare_runs) / positions,
        "generate_faults_per_position": statistics.median(g.faults for g in gen_runs) / positions,
    }
    startup = next((s["seconds"] for s in breakdown["stages"] if s["stage"] == STARTUP), None)
    if startup is not None:
        overhead["startup_seconds_instrumented"] = startup
        overhead["wall_ratio_without_startup"] = statistics.median((g.wall - startup) / b.wall for b, g in zip(bare_runs, gen_runs))
    sections["overhead"] = time.perf_counter() - section

    # -- 2. bytes per position
    section = time.perf_counter()
    sizes = {"lm_timing_shards": bytes_record(work / "out" / "lm")}
    log(f"bytes: V={LM_VOCAB} token model, {size.bytes_rows} rows in one shard; classifier, {size.classifier_rows} rows")
    for key, corpus_path, batch_size in (
        ("lm_bytes_peaked", bytes_corpus, 8), ("lm_bytes_uniform", bytes_corpus, 8),
        ("cls_peaked", cls_corpus, 256), ("cls_uniform", cls_corpus, 256),
    ):
        target = work / "out" / key
        run_generate(corpus_path, teachers[key]["spec"], target, batch_size, 1 << 20)
        sizes[key] = bytes_record(target)
    sections["bytes"] = time.perf_counter() - section

    # -- 3. peak RSS, 1x and 10x corpus, child processes
    section = time.perf_counter()
    log(f"RSS: softlabels generate in child processes on {size.rss_rows} and {10 * size.rss_rows} rows")
    rss: dict[str, Any] = {}
    for factor in (1, 10):
        rss[f"{factor}x"] = rss_run(rss_corpora[factor], teachers["rss"]["spec"], work / "out" / f"rss-{factor}x", size.rss_batch_size, size.rss_rows_per_shard)
    rss["ratio"] = rss["10x"]["peak_kb"] / rss["1x"]["peak_kb"]
    above = [rss[f]["peak_kb"] - rss[f]["baseline_kb"] for f in ("1x", "10x")]
    rss["above_imports_ratio"] = above[1] / max(above[0], 1)
    sections["rss"] = time.perf_counter() - section

    results = {
        "command": command,
        "mode": mode,
        "seconds": time.perf_counter() - started,
        "sections": sections,
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "pyarrow": pa.__version__,
            "cpus": os.cpu_count(), "torch_threads": threads, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        },
        "overhead": overhead,
        "breakdown": breakdown,
        "bytes": sizes,
        "rss": rss,
        "teachers": teachers,
    }
    (args.out / f"results-{mode}.json").write_text(json.dumps(results, indent=2))
    print(render(results))
    return 0


def _mb(kb: float) -> str:
    return f"{kb / 1024:,.0f} MB"


def render(r: dict[str, Any]) -> str:
    o, b, rss, env, t = r["overhead"], r["bytes"], r["rss"], r["environment"], r["teachers"]
    ratios = ", ".join(f"{x:.2f}" for x in o["wall_ratios"])
    lines = [
        f"## softlabels generate benchmark ({r['mode']})",
        "",
        f"`{r['command']}` (run from the repository root): {r['seconds']:.0f} s in total; torch {env['torch']}, "
        f"{env['cpus']} CPUs, {env['torch_threads']} torch threads; load average {env['loadavg_start'][0]:.1f} at start, "
        f"{env['loadavg_end'][0]:.1f} at end.",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        f"| pipeline overhead: generate / bare teacher forward, wall time, median of {len(o['wall_ratios'])} "
        f"alternating pairs ({ratios}) | **{o['wall_ratio_median']:.2f}** | <= 1.10 |",
    ]
    if "wall_ratio_without_startup" in o:
        lines.append(f"| same, without generate's startup ({o['startup_seconds_instrumented']:.2f} s: open corpus, load and hash teacher, probe) | {o['wall_ratio_without_startup']:.2f} | |")
    lines += [
        f"| same, fastest generate / fastest bare forward (less sensitive to other load on the machine) | {o['best_wall_ratio']:.2f} | |",
        f"| same, process CPU time (median of pair ratios) | {o['cpu_ratio_median']:.2f} | |",
        f"| us per position: bare forward / generate / difference | {o['bare_us_per_position']:,.0f} / "
        f"{o['generate_us_per_position']:,.0f} / {o['overhead_us_per_position']:,.0f} | |",
        f"| minor page faults per position: bare forward / generate | {o['bare_faults_per_position']:.0f} / {o['generate_faults_per_position']:.0f} | |",
        f"| the same overhead on another V={LM_VOCAB:,} teacher taking T us per position: ratio ~ 1 + {o['overhead_us_per_position']:,.0f} / T "
        f"(1.10 needs T >= {10 * o['overhead_us_per_position']:,.0f} us on this machine) | | |",
    ]
    labels = {
        "lm_timing_shards": f"token model V={LM_VOCAB:,}, the overhead runs' shards, peaked teacher (top-1 {t['lm']['mean_top1']:.2f})",
        "lm_bytes_peaked": f"token model V={LM_VOCAB:,}, one realistic shard, peaked teacher (top-1 {t['lm_bytes_peaked']['mean_top1']:.2f})",
        "lm_bytes_uniform": f"token model V={LM_VOCAB:,}, one realistic shard, random-init teacher (near-uniform, top-1 {t['lm_bytes_uniform']['mean_top1']:.1e})",
        "cls_peaked": f"classifier C={CLASSIFIER_CLASSES:,}, peaked teacher (top-1 {t['cls_peaked']['mean_top1']:.2f})",
        "cls_uniform": f"classifier C={CLASSIFIER_CLASSES:,}, random-init teacher (near-uniform, top-1 {t['cls_uniform']['mean_top1']:.1e})",
    }
    for key, label in labels.items():
        rec = b[key]
        col = rec["column_bytes_per_position"]
        lines.append(
            f"| bytes/position at k={TOP_K} ({rec['id_type']} ids, {rec['logprob_type']} log-probs), {label}; "
            f"{rec['positions']:,} positions in {rec['shards']} shard(s): **soft-label** (ids + log-probs) / total | "
            f"**{rec['soft_label_bytes_per_position']:.1f}** ({col.get('topk_ids', 0):.1f} + {col.get(rec['logprob_column'], 0):.1f}) / "
            f"{rec['bytes_per_position']:.1f} | <= {RAW_BYTES} |"
        )
    lines += [
        f"| peak RSS (VmHWM), 1x corpus: {rss['1x']['rows']:,} rows, {rss['1x']['positions']:,} positions, {rss['1x']['shards']} shards "
        f"| {_mb(rss['1x']['peak_kb'])} (after imports {_mb(rss['1x']['baseline_kb'])}) | |",
        f"| peak RSS (VmHWM), 10x corpus: {rss['10x']['rows']:,} rows, {rss['10x']['positions']:,} positions, {rss['10x']['shards']} shards "
        f"| {_mb(rss['10x']['peak_kb'])} (after imports {_mb(rss['10x']['baseline_kb'])}) | |",
        f"| peak RSS 10x / 1x (growth above imports: {rss['above_imports_ratio']:.2f}x) | **{rss['ratio']:.3f}** | <= 1.10 |",
        "| RSS sampled every 10 ms, peak in each tenth of the 10x run (growth shows as a rising sequence) | "
        + ", ".join(f"{kb / 1024:.0f}" for kb in rss["10x"].get("sampled_peak_kb_by_tenth", [])) + " MB | |",
        "",
        f"Overhead runs: teacher `{o['teacher']['factory']}` ({o['teacher']['parameters'] / 1e6:.0f}M parameters, V={LM_VOCAB:,}), "
        f"{o['rows']} rows of {LM_LENGTHS[0]}-{LM_LENGTHS[1]} random tokens ({o['positions']:,} positions), "
        f"--batch-size {o['batch_size']}, --rows-per-shard {o['rows_per_shard']} ({o['batches']} batches). "
        "Total bytes include sample ids, the passed-through input column (int32 tokens; 64 random float32 features for "
        "the classifier), confidence, entropy and Parquet overhead. Section times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in r["sections"].items()) + ".",
        "",
        f"Where generate's time goes (one instrumented run of the overhead case, {r['breakdown']['positions']:,} positions, "
        f"wall {r['breakdown']['wall']:.2f} s; seconds on the thread that ran the stage; main-thread rows nest: "
        "process_unit contains the four rows below it and the 'rest of' row):",
        "",
        "| thread | stage | calls | seconds | share of wall | us/position | minor faults/position |",
        "|---|---|---|---|---|---|---|",
    ]
    wall, count = r["breakdown"]["wall"], max(r["breakdown"]["positions"], 1)
    order = [STARTUP, "read unit (Parquet -> Arrow)", PROCESS_UNIT, *INNER]
    def rank(row: dict[str, Any]) -> tuple[int, int, float]:
        stage = row["stage"]
        return (row["thread"] != "main", order.index(stage) if stage in order else len(order), -row["seconds"])
    for row in sorted(r["breakdown"]["stages"], key=rank):
        lines.append(
            f"| {row['thread']} | {row['stage']} | {row['calls']} | {row['seconds']:.2f} | {row['seconds'] / wall:.1%} | "
            f"{row['seconds'] / count * 1e6:,.0f} | {row['minor_faults'] / count:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
