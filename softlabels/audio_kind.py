"""The audio input kind (``--audio-column``): corpus audio cells to the teacher and back to frames.

One module holds what an audio run does differently (DESIGN.md section 4, Audio):

* its settings (the audio column, the teachers' ``sample_rate``) and the column-type check;
* the reader stage (``read_unit``): every cell of a unit decoded, mixed to mono and resampled with
  soxr (``softlabels.audio_input``), so decoding overlaps the teacher; the rows gain ``duration_s``
  (float32 seconds of the source audio) and hidden columns that are never stored (the waveform, the
  batch, the row's place in corpus order);
* the batches of a unit: by length, capped by ``--batch-size`` rows and ``--batch-seconds`` of padded
  audio. ``read_unit`` puts the rows in that order (one batch after another), so no stage copies the
  waveforms again; the shard puts them back in corpus order (``spans``);
* the teacher call (``teacher_inputs`` and ``teacher_outputs``): ``model(waveforms float32 [B, S_max]
  zero-padded, lengths int64 [B])`` -> ``(logits [B, F_max, C], frame_lengths int64 [B])``; a row's
  positions are its frames, and ensemble members must agree on them.

Bad audio (undecodable, empty, truncated, unreadable, a rate soxr cannot convert) is one line naming
the sample id; with ``--on-bad-audio skip`` the row is dropped and its id and reason are recorded
(the shard's journal entry, then the manifest's ``skipped_samples``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from .audio_input import audio_bytes, decode_audio, read_clip, resample
from .batching import BATCH_COLUMN, ROW_COLUMN, batch_order, batch_spans, length_batches, with_batch_columns
from .corpus import Corpus, Unit
from .errors import UserError
from .inputs import PROBE_ROWS, TeacherInputs, pad_rows, to_teacher_inputs

__all__ = ["AudioBlock", "WAVEFORM_COLUMN", "DURATION_COLUMN", "AUDIO_ROWS_PER_SHARD", "SKIPPED_KEY", "AudioKind", "check_audio_type", "is_audio_struct", "teacher_sample_rate"]

WAVEFORM_COLUMN = "__softlabels_waveform"
"""The decoded samples (large_list<float32>) between the reader stage and the teacher; never stored."""
HIDDEN = [WAVEFORM_COLUMN, BATCH_COLUMN, ROW_COLUMN]
DURATION_COLUMN = "duration_s"
AUDIO_ROWS_PER_SHARD = 256
"""Rows per unit of an audio run unless ``--rows-per-shard`` says: a unit's decoded audio is held in
memory (256 utterances of 10 s at 16 kHz: 164 MB), and the next unit is decoded meanwhile."""
SKIPPED_KEY = b"softlabels.skipped_samples"
"""Schema metadata of a read unit: JSON [{sample_id, reason}] of the rows the reader dropped."""


def is_audio_struct(data_type: pa.DataType) -> bool:
    """An HF ``datasets`` Audio struct: ``bytes`` (binary) and/or ``path`` (string)."""
    if not pa.types.is_struct(data_type):
        return False
    names = {data_type.field(i).name: data_type.field(i).type for i in range(data_type.num_fields)}
    return ("bytes" in names or "path" in names) and all(
        name not in names or kind(names[name]) for name, kind in (("bytes", _is_binary), ("path", _is_string)))


def check_audio_type(data_type: pa.DataType, column: str) -> None:
    """Raise a UserError naming the column unless it holds an HF Audio struct, bytes or path strings."""
    if is_audio_struct(data_type) or _is_binary(data_type) or _is_string(data_type):
        return
    raise UserError(f"--audio-column {column!r} has type {data_type}; expected an HF Audio struct<bytes: binary, path: string>, "
                    "binary (the file's bytes) or string (a path, relative to the corpus file)")


def _is_binary(data_type: pa.DataType) -> bool:
    return pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type)


def _is_string(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


class AudioBlock:
    """The audio column of shard rows, for training (``softlabels.data``): any rows decode, as the
    teacher heard them (mono, resampled to the run's ``sample_rate``), into zero-padded waveforms
    float32 [B, S_max] and lengths int64 [B], the student's ``model(waveforms, lengths)``.

    Cells are decoded when a batch asks for them, so an epoch holds one batch of samples at a time.
    """

    ragged = True

    def __init__(self, column: pa.Array | pa.ChunkedArray, name: str, sample_rate: Any, sample_ids: np.ndarray) -> None:
        check_audio_type(column.type, name)
        if not isinstance(sample_rate, int) or sample_rate < 1:
            raise UserError(f"column {name!r} holds audio, but the rows have no shard header to give its sample_rate "
                            "(read an audio run with softlabels' loader, or collate a table read from a shard)")
        self.cells = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        self.name, self.sample_rate, self.sample_ids = name, sample_rate, sample_ids

    def gather(self, rows: np.ndarray, fill: float = 0.0, dtype: type | None = None, plan: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """waveforms float32 [B, S_max] (padded with ``fill``) and lengths int64 [B] of ``rows``."""
        clips = [read_clip(self.cells[int(row)].as_py(), None, f"column {self.name!r}, sample id {self.sample_ids[int(row)]}",
                           self.sample_rate).samples for row in rows]
        return pad_rows(clips, fill, np.float32), np.array([len(c) for c in clips], dtype=np.int64)


def teacher_sample_rate(teachers: Sequence[Any]) -> int:
    """The one ``sample_rate`` (Hz) every teacher's model declares.

    Raises:
        UserError: a teacher without an integer ``sample_rate``, or teachers that expect different rates.
    """
    rates = []
    for teacher in teachers:
        rate = getattr(teacher.module, "sample_rate", None)
        if isinstance(rate, float) and rate.is_integer():
            rate = int(rate)
        if not isinstance(rate, int) or isinstance(rate, bool) or rate < 1:
            raise UserError(f"--teacher {teacher.spec}: an audio teacher needs a sample_rate attribute (samples per second "
                            f"it expects), got {rate!r}")
        rates.append(rate)
    if len(set(rates)) > 1:
        described = ", ".join(f"{t.spec} expects {r} Hz" for t, r in zip(teachers, rates))
        raise UserError(f"ensemble sample rate mismatch: {described}; the teachers of one run share their input")
    return rates[0]


def _shown(ids: list[Any]) -> str:
    return ", ".join(map(str, ids[:5])) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


@dataclass
class AudioKind:
    """The audio input kind of one run.

    Attributes:
        column: ``--audio-column``.
        sample_rate: what the teachers expect; every clip is resampled to it.
        skip_bad: ``--on-bad-audio skip``: drop and record bad rows instead of stopping.
        batch_size: ``--batch-size``, the most rows per batch.
        batch_seconds: ``--batch-seconds``, the most padded seconds of audio per batch (None: no cap
            but ``batch_size`` rows).
    """

    column: str
    sample_rate: int | None = None  # what the teachers expect (check_teachers); None until then
    skip_bad: bool = False
    batch_size: int = 64
    batch_seconds: float | None = None
    counts_documents = False  # class attributes (unannotated): progress counts rows,
    default_rows_per_shard = AUDIO_ROWS_PER_SHARD  # and a unit's decoded audio is held in memory

    def check_column(self, schema: pa.Schema) -> None:
        check_audio_type(schema.field(self.column).type, self.column)

    def check_teachers(self, teachers: Sequence[Any]) -> None:
        """Every teacher has the same integer ``sample_rate``; the clips are resampled to it."""
        self.sample_rate = teacher_sample_rate(teachers)

    def check_vocab(self, vocab_size: int) -> None:
        """Nothing to check: the teachers' classes are the targets."""

    def settings(self) -> dict[str, Any]:
        """What the run fingerprint, the manifest and every shard header record of the audio input."""
        return {"audio_column": self.column, "sample_rate": self.sample_rate}

    def read_unit(self, corpus: Corpus, unit: Unit, table: pa.Table) -> pa.Table:
        """A unit's corpus rows with their audio decoded at ``sample_rate``, ``duration_s`` appended, in
        the order the teacher computes them (``spans``).

        Raises:
            UserError: naming the sample id of a bad row (unless ``skip_bad``, which drops it and lists
                it under the schema metadata ``SKIPPED_KEY``).
        """
        corpus_file = str(corpus.files[unit.file_index].path)
        cells = table.column(self.column).to_pylist()
        ids = table.column("sample_id").to_pylist()
        samples: list[np.ndarray] = []
        durations: list[float] = []
        keep = np.ones(len(ids), dtype=bool)
        skipped: list[dict[str, str]] = []
        for row, (cell, sample_id) in enumerate(zip(cells, ids)):
            sample = f"--audio-column {self.column!r}, sample id {sample_id}"
            try:
                if cell is None:
                    raise UserError(f"{sample}: the audio cell is null")
                clip = decode_audio(audio_bytes(cell, corpus_file, sample), sample)
                durations.append(clip.seconds)
                samples.append(resample(clip, self.sample_rate, sample).samples)
            except UserError as exc:
                if not self.skip_bad:
                    raise UserError(f"{exc} (--on-bad-audio skip drops such rows and records them)") from None
                keep[row] = False
                skipped.append({"sample_id": str(sample_id), "reason": str(exc).split(": ", 2)[-1]})
        if not keep.all():
            table = table.filter(pa.array(keep))
        lengths = np.array([len(s) for s in samples], dtype=np.int64)
        order, batch_of = batch_order(self.batches(lengths))  # the waveforms are laid out in batch order once, not copied again
        offsets = np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64)
        values = np.concatenate([samples[i] for i in order]) if samples else np.zeros(0, dtype=np.float32)
        table = table.take(pa.array(order)) if not np.array_equal(order, np.arange(len(order))) else table
        table = table.append_column(pa.field(DURATION_COLUMN, pa.float32()), pa.array(np.array(durations, dtype=np.float32)[order]))
        table = table.append_column(WAVEFORM_COLUMN, pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32())))
        return with_batch_columns(table, order, batch_of).replace_schema_metadata({SKIPPED_KEY: json.dumps(skipped).encode()})

    @staticmethod
    def skipped(table: pa.Table) -> list[dict[str, str]]:
        """The rows ``read_unit`` dropped from this unit: [{sample_id, reason}]."""
        metadata = table.schema.metadata or {}
        return json.loads(metadata.get(SKIPPED_KEY, b"[]"))

    @staticmethod
    def stored(table: pa.Table) -> pa.Table:
        """The rows as the shard stores them: without the hidden columns."""
        return table.drop_columns(HIDDEN).replace_schema_metadata(None)

    @staticmethod
    def spans(table: pa.Table) -> tuple[list[tuple[int, int]], np.ndarray]:
        """A read unit's batches as (first row, rows) spans of its rows, and each row's place in corpus order."""
        return batch_spans(table)

    def batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Row indices of batches by length (longest first), given each row's samples: at most
        ``batch_size`` rows and, with ``batch_seconds``, that many padded seconds (a longer row goes alone)."""
        cap = int(self.batch_seconds * self.sample_rate) if self.batch_seconds is not None else int(lengths.sum()) + 1
        return [np.asarray(b, dtype=np.int64) for b in length_batches(lengths.tolist(), max(1, cap), self.batch_size)]

    def teacher_inputs(self, batch: pa.Table, sample_ids: pa.Array) -> TeacherInputs:
        """waveforms float32 [B, S_max] zero-padded and lengths int64 [B] (samples at ``sample_rate``)."""
        return to_teacher_inputs(batch.column(WAVEFORM_COLUMN), self.column, sample_ids)

    def teacher_outputs(self, teachers: Sequence[Any], inputs: TeacherInputs, sample_ids: pa.Array) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every teacher's ``(logits [B, F_max, C], frame_lengths [B])`` on one batch: (the logits, the
        frames per row that all teachers agree on).

        Raises:
            UserError: an output that breaks the convention, or teachers that disagree on frame_lengths.
        """
        logits: list[torch.Tensor] = []
        frames: torch.Tensor | None = None
        first = None
        for teacher in teachers:
            member, lengths = self._frames(teacher, teacher.call(inputs), inputs, sample_ids)
            if frames is not None and not torch.equal(lengths, frames):
                differ = (lengths != frames).cpu().numpy()
                raise UserError(f"ensemble frame mismatch: --teacher {first.spec} and --teacher {teacher.spec} give different "
                                f"frame_lengths for sample ids {_shown(sample_ids.filter(pa.array(differ)).to_pylist())}; "
                                "the teachers of an audio ensemble must share their frame rate")
            logits.append(member)
            frames, first = (lengths, teacher) if frames is None else (frames, first)
        return logits, frames

    @staticmethod
    def _frames(teacher: Any, output: Any, inputs: TeacherInputs, sample_ids: pa.Array) -> tuple[torch.Tensor, torch.Tensor]:
        """One teacher's output checked against the convention: (logits [B, F_max, C], int64 frame_lengths [B])."""
        rows = inputs.x.shape[0]
        if not (isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(o, torch.Tensor) for o in output)):
            raise UserError(f"--teacher {teacher.spec}: an audio teacher returns (logits [B, F, C], frame_lengths [B]) "
                            f"(torchaudio's convention), got {type(output).__name__}")
        logits, lengths = output
        if logits.dim() != 3 or logits.shape[0] != rows or lengths.shape != (rows,) or lengths.is_floating_point():
            raise UserError(f"--teacher {teacher.spec}: expected logits [{rows}, F, C] and integer frame_lengths [{rows}], "
                            f"got {tuple(logits.shape)} and {tuple(lengths.shape)} {lengths.dtype}")
        lengths = lengths.to(device=logits.device, dtype=torch.int64)
        bad = (lengths < 1) | (lengths > logits.shape[1])
        if bool(bad.any()):
            raise UserError(f"--teacher {teacher.spec}: frame_lengths outside 1..{logits.shape[1]} for sample ids "
                            f"{_shown(sample_ids.filter(pa.array(bad.cpu().numpy())).to_pylist())}")
        return logits, lengths

    def probe_table(self, corpus: Corpus) -> pa.Table:
        """The first decodable rows (for the vocabulary probe).

        Raises:
            UserError: a bad row among them (not skipping), or none of the first unit's rows decodes.
        """
        first = corpus.units[0]
        for stop in sorted({min(first.rows, PROBE_ROWS), first.rows}):
            table = self.read_unit(corpus, first, corpus.read_unit(Unit(first.index, first.file_index, first.start, first.start + stop)))
            if table.num_rows:
                return table.slice(0, PROBE_ROWS)
        raise UserError(f"--audio-column {self.column!r}: none of the first {first.rows} rows holds decodable audio")
