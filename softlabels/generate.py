"""``softlabels generate``: run teachers over a corpus and commit soft-label shards (top-k, or
sampled targets with ``--targets sample``).

This module prepares a run (checks, corpus units, teachers, the vocabulary probe, settings and
fingerprint, the header), asks the run directory to begin it (``RunDirectory.begin``: what is
committed, what is pending), hands the pending units to an engine (``pipeline.run_units_locally`` or
``ray_engine.run_units_on_ray``), and asks the directory to seal when every unit is committed
(``RunDirectory.seal_if_complete``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__
from .codec import LogprobCodec
from .corpus import Corpus, corpus_record, open_corpus
from .distributed import autocast, distributed_env, resolve_device
from .errors import UserError
from .hf import disable_progress_bars
from .inputs import ColumnsKind
from .claim import claim_output
from .lease import lease_scope
from .options import GenerateConfig, flag_of
from .pipeline import GenerationRun, InputKind, run_units_locally
from .rundir import Plan, RunDirectory, RunSpec, settings_fingerprint, settings_run_header
from .targets import kind_named
from .schema import FORMAT, TARGETS_COLUMN, TOKENS_COLUMN
from .storage import is_uri
from .loading import portable_name
from .teachers import Teacher, load_teacher
from .text import DocumentWindows, DocumentsKind, TokenizerSource, load_tokenizer, tokenizer_identity
from .audio_kind import AudioKind

__all__ = ["GenerateConfig", "GenerateSummary", "generate"]


# Settings that change what is written, and the flag a user changes each by (options.flag_of for the rest).
SETTING_FLAGS = {"corpus": "CORPUS", "teachers": "--teacher", "vocab_size": "--teacher (vocabulary size)", "format": "the softlabels version"}


def _corpus_inputs(config: GenerateConfig) -> list[tuple[str, str]]:
    """The CORPUS arguments ``--out`` stays apart from: store URIs and local files or folders (a glob or
    a missing file is named by ``open_corpus``)."""
    return [(str(argument), "CORPUS") for argument in config.corpus if is_uri(str(argument)) or Path(argument).exists()]


def _check_engine(config: GenerateConfig) -> None:
    """``--engine ray`` needs Ray and, with ``--ray-address``, a cluster that answers."""
    if config.engine != "ray":
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'softlabels[ray]'") from None
    from .ray_engine import check_address

    check_address(config.ray_address)


@dataclass
class GenerateSummary:
    """What a run did; ``render()`` is the paragraph printed at the end."""

    out: str
    rows: int
    positions: int
    shards: int
    shards_written: int
    bytes: int
    soft_label_bytes: int
    fidelity: dict[str, float]
    skipped_nonfinite: int
    seconds: float
    already_complete: bool = False

    sealed: bool = True
    rank_note: str = ""
    targets: str = "topk"
    skipped_samples: int = 0

    @classmethod
    def partial(cls, run: "GenerationRun", rank: int, world: int, entries: dict[int, dict[str, Any]], written: int, seconds: float) -> "GenerateSummary":
        mine = [e for unit, e in entries.items() if unit % world == rank]
        note = f"rank {rank} of {world}: its {len(mine)} shards are committed; the last rank to finish seals {run.config.out}"
        return cls(str(run.config.out), sum(e["rows"] for e in mine), sum(e["positions"] for e in mine), len(mine), written,
                   sum(e["bytes"] for e in mine), sum(e["soft_label_bytes"] for e in mine), {}, 0, seconds, sealed=False, rank_note=note)

    def render(self) -> str:
        if not self.sealed:
            return f"{self.rank_note} ({self.shards_written} written this run, {self.seconds:.1f} s)."
        per_position = self.bytes / max(self.positions, 1)
        soft_per_position = self.soft_label_bytes / max(self.positions, 1)
        state = "already complete, nothing to do" if self.already_complete else f"{self.shards_written} written this run"
        skipped = f", {self.skipped_nonfinite} rows skipped for non-finite teacher outputs" if self.skipped_nonfinite else ""
        skipped += f", {self.skipped_samples} bad rows skipped (manifest: skipped_samples)" if self.skipped_samples else ""
        head = (f"{self.out}: {self.rows:,} rows, {self.positions:,} positions in {self.shards} shards ({state}){skipped}; "
                f"{self.bytes:,} bytes on disk, {per_position:.1f} bytes/position ")
        return head + f"{kind_named(self.targets).describe_fidelity(soft_per_position, self.fidelity)}; {self.seconds:.1f} s."


def _fingerprint(settings: dict[str, Any]) -> str:
    return settings_fingerprint(settings)


def _setting_flags() -> dict[str, str]:
    """The flag (or argument) a user changes each setting by, for the refusal of an --out holding another run."""
    flags = {item.name: flag_of(GenerateConfig, item.name) for item in dataclasses.fields(GenerateConfig) if "option" in item.metadata}
    return {**flags, **SETTING_FLAGS}


def _probe_vocab(config: GenerateConfig, corpus: Corpus, teachers: list[Teacher], device: torch.device, kind: InputKind) -> int:
    """Run every teacher on the input kind's probe rows so vocabulary mismatches and k > V fail before any work."""
    table = kind.probe_table(corpus)
    sample_ids = table.column("sample_id").combine_chunks()
    inputs = kind.teacher_inputs(table, sample_ids).to(device)
    vocab_sizes: list[int] = []
    for teacher in teachers:
        try:
            with torch.inference_mode(), autocast(device, config.precision):
                logits = kind.teacher_outputs([teacher], inputs, sample_ids)[0][0]
        except UserError:
            raise
        except Exception as exc:  # the user's model rejected our calling convention
            shape = f"x {tuple(inputs.x.shape)} {inputs.x.dtype}" + ("" if inputs.lengths is None else ", lengths [B]")
            raise UserError(f"--teacher {teacher.spec}: forward failed on {shape}: {type(exc).__name__}: {exc}") from None
        vocab_sizes.append(int(logits.shape[-1]))
    if len(set(vocab_sizes)) > 1:
        described = ", ".join(f"{t.spec} has {v}" for t, v in zip(teachers, vocab_sizes))
        raise UserError(f"ensemble vocab mismatch: {described} classes")
    kind.check_vocab(vocab_sizes[0])
    kind_named(config.targets).prepare(config, vocab_sizes[0])
    return vocab_sizes[0]


def _tokenizer_flag(config: GenerateConfig) -> str:
    return f"--tokenizer {config.tokenizer}" if config.tokenizer else f"--teacher {_tokenizer_spec(config)}"


def _tokenizer_spec(config: GenerateConfig) -> str:
    """--tokenizer, else the first hf: teacher."""
    if config.tokenizer:
        return config.tokenizer
    spec = next((t for t in config.teachers if t.startswith("hf:")), None)
    if spec is None:
        flag = "--text-column" if config.text_column else "--chat-column"
        raise UserError(f"{flag} needs a tokenizer: pass --tokenizer hf:DIR (no hf: teacher to take it from)")
    return spec


def _document_windows(config: GenerateConfig) -> tuple[DocumentWindows | None, dict[str, Any]]:
    """The tokenizer stage of a --text-column / --chat-column run and what it adds to the settings."""
    column = config.text_column or config.chat_column
    if column is None:
        return None, {}
    source = TokenizerSource.of(_tokenizer_spec(config), "--tokenizer" if config.tokenizer else "--teacher")
    documents = DocumentWindows(load_tokenizer(source), column, config.chat_column is not None, config.max_length, config.pack)
    settings = {"text_column": config.text_column, "chat_column": config.chat_column, "max_length": config.max_length,
                "pack": config.pack, "tokenizer": {"name": portable_name(source.spec), "sha256": tokenizer_identity(source)}}
    return documents, settings


def _input_kind(config: GenerateConfig, documents: DocumentWindows | None, text_settings: dict[str, Any]) -> InputKind:
    """How the corpus rows reach the teachers: decoded audio, token windows of documents, or the input
    column; ``config.input_column`` becomes the column the teachers read."""
    if config.audio_column is not None:
        config.input_column = config.audio_column
        return AudioKind(config.audio_column, None, config.on_bad_audio == "skip", config.batch_size, config.batch_seconds)
    if documents is not None:
        config.input_column = TOKENS_COLUMN
        return DocumentsKind(documents, TOKENS_COLUMN, config.batch_size, _tokenizer_flag(config), text_settings, config.batch_positions)
    return ColumnsKind(config.input_column, config.batch_size, config.batch_positions)


def _prepare(config: GenerateConfig, directory: RunDirectory | None = None) -> GenerationRun:
    """Every check of the corpus and teachers, the vocabulary probe, the settings, fingerprint and run
    header; ``directory`` is ``config.out`` as ``RunDirectory.for_output`` opened it (opened here if None)."""
    documents, text_settings = _document_windows(config)
    source_column = config.text_column or config.chat_column or config.audio_column or config.input_column
    kind = _input_kind(config, documents, text_settings)
    if config.rows_per_shard is None:
        config.rows_per_shard = kind.default_rows_per_shard  # None: sized from the rows (corpus.auto_rows_per_shard)
    corpus = open_corpus(config.corpus, source_column, config.id_column, config.label_column, config.rows_per_shard)
    config.rows_per_shard = corpus.rows_per_shard
    kind.check_column(corpus.passthrough_schema())
    device = resolve_device(config.device, distributed_env().local_rank)
    teachers = [load_teacher(spec, device) for spec in config.teachers]
    kind.check_teachers(teachers)
    vocab_size = _probe_vocab(config, corpus, teachers, device, kind)
    settings = {
        "format": FORMAT,
        "ensemble": config.ensemble if len(teachers) > 1 else "single",
        "teachers": [{"sha256": t.sha256} for t in teachers],
        "corpus": corpus_record(corpus),
        "input_column": config.input_column,
        "id_column": config.id_column,
        "label_column": config.label_column,
        "rows_per_shard": config.rows_per_shard,
        "precision": config.precision,
        "vocab_size": vocab_size,
        **kind.settings(),  # recorded in the fingerprint, the manifest and every header
    }
    targets = kind_named(config.targets)
    settings.update(targets.settings(config))
    codec = LogprobCodec.named(config.logprob_dtype)
    settings["logprob_dtype"] = codec.dtype
    fingerprint = _fingerprint(settings)
    directory = directory if directory is not None else RunDirectory.for_output(config.out)
    run = GenerationRun(config, directory, corpus, teachers, device, vocab_size, settings, fingerprint, codec, input_kind=kind)
    fields = {**targets.header(config), "teachers": [{"name": portable_name(t.spec), "sha256": t.sha256} for t in teachers],
              "teacher_temperature": 1.0, "softlabels_version": __version__, **codec.header_fields()}
    if config.chat_column is not None:
        fields["target_positions_column"] = TARGETS_COLUMN
    run.header = settings_run_header(settings, fingerprint, fields)
    return run


def _rank() -> tuple[int, int]:
    """This process's share of the units under torchrun (RANK / WORLD_SIZE), else (0, 1)."""
    env = distributed_env()
    return env.rank, env.world_size


def _summary(run: GenerationRun, manifest: dict[str, Any], written: int, started: float, already: bool) -> GenerateSummary:
    totals = manifest["totals"]
    return GenerateSummary(
        out=str(run.config.out),
        rows=totals["rows"],
        positions=totals["positions"],
        shards=totals["shards"],
        shards_written=written,
        bytes=totals["bytes"],
        soft_label_bytes=totals["soft_label_bytes"],
        fidelity=manifest["fidelity"],
        skipped_nonfinite=totals["skipped_nonfinite"],
        seconds=time.perf_counter() - started,
        already_complete=already,
        targets=run.config.targets,
        skipped_samples=len(manifest.get("skipped_samples", [])),
    )


@lease_scope
def generate(config: GenerateConfig) -> GenerateSummary:
    """Run (or resume) a generation job and seal the directory.

    Every check of the corpus and teachers runs before the output directory is touched. Committed
    shards of the same fingerprint are kept; missing or damaged ones are regenerated.

    Raises:
        UserError: bad input or settings that differ from the run already in ``config.out``.
        KeyboardInterrupt: after committing whole shards only and removing partial files.
    """
    started = time.perf_counter()
    if not config.progress:
        disable_progress_bars()
    claim_output(config.out, "softlabels generate", lambda out: RunDirectory.for_output(out).foreign_file(),
                 _corpus_inputs(config))  # one writer per --out, until generate ends
    output = RunDirectory.for_output(config.out)
    _check_engine(config)
    run = _prepare(config, output)
    rank, world = _rank()
    spec = RunSpec(run.fingerprint, run.settings, run.header, len(run.corpus.units), _setting_flags())
    plan = run.directory.begin(spec, rank, world)  # a damaged manifest is rebuilt; data/ and the settings are this run's
    if plan.sealed is not None:
        return _summary(run, plan.sealed, 0, started, already=True)
    entries = _run_pending(run, plan)
    manifest = run.directory.seal_if_complete(plan, entries)
    if manifest is None:  # the last rank to finish seals the directory
        return GenerateSummary.partial(run, rank, world, entries, len(plan.pending), time.perf_counter() - started)
    return _summary(run, manifest, len(plan.pending), started, already=False)


def _run_pending(run: GenerationRun, plan: Plan) -> dict[int, dict[str, Any]]:
    """Commit the plan's pending units through the configured engine, with a progress bar; returns the
    entries of this rank's units (those committed before and those written now). On any exception
    (Ctrl-C too) this rank's partial files are removed first."""
    config = run.config
    units = run.corpus.units
    done_rows = sum(units[index].rows for index in plan.committed)
    bar = tqdm(total=sum(units[index].rows for index in plan.mine), initial=done_rows, unit="row", desc="generate",
               file=sys.stderr, disable=not config.progress, dynamic_ncols=True)
    position_count = [0, time.perf_counter()]

    def on_batch(rows: int, positions: int) -> None:
        position_count[0] += positions
        bar.update(rows)
        elapsed = max(time.perf_counter() - position_count[1], 1e-9)
        bar.set_postfix_str(f"{position_count[0] / elapsed:,.0f} pos/s", refresh=False)

    entries: dict[int, dict[str, Any]] = dict(plan.committed)
    if config.engine == "ray":
        from .ray_engine import run_units_on_ray as run_units
    else:
        run_units = run_units_locally
    try:
        run_units(run, plan.journal, [units[index] for index in plan.pending], on_batch, entries)
    except BaseException:
        run.directory.discard_staged(plan.mine)
        bar.leave = False  # the error line should stand alone, not under a frozen bar
        bar.close()
        raise
    bar.close()
    return entries
