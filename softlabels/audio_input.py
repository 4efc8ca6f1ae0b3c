"""Audio as an input: a corpus cell to mono float32 samples at the teacher's rate (extra ``[audio]``).

A cell of ``--audio-column`` is an HF ``datasets`` Audio struct (``bytes``, ``path``; a null ``bytes``
reads ``path``), bare bytes, or a path string. A relative path is relative to the corpus file's
folder, local or URI. Decoding is soundfile's (WAV, FLAC, OGG, ...), channels are averaged to mono,
and soxr resamples to the teacher's ``sample_rate`` when the rates differ.

Every failure names the sample: undecodable bytes, a file that cannot be read, no samples, or a WAV
whose data chunk is cut short (libsndfile would silently read what is there).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UserError
from .storage import Location, StoreError, is_uri

__all__ = ["Clip", "decode_audio", "resample", "audio_bytes", "read_clip"]


@dataclass(frozen=True)
class Clip:
    """One utterance: samples float32 [S] (mono, in [-1, 1] for PCM) at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def _soundfile() -> Any:
    try:
        import soundfile
    except ImportError:
        raise UserError("--audio-column needs soundfile and soxr: pip install 'softlabels[audio]'") from None
    return soundfile


def _wav_data_cut_short(data: bytes) -> bool:
    """A RIFF/WAVE file whose ``data`` chunk declares more bytes than the file holds."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return False
    offset = 12
    while offset + 8 <= len(data):
        name, size = data[offset: offset + 4], struct.unpack("<I", data[offset + 4: offset + 8])[0]
        if name == b"data":
            return size not in (0, 0xFFFFFFFF) and offset + 8 + size > len(data)  # 0 / -1: a streamed header
        offset += 8 + size + (size & 1)
    return False


def decode_audio(data: bytes, sample: str) -> Clip:
    """Decode one file's bytes to a mono Clip at its own rate.

    Raises:
        UserError: naming ``sample`` (for example ``sample id utt-7``): undecodable, truncated or empty audio.
    """
    soundfile = _soundfile()
    if _wav_data_cut_short(data):
        raise UserError(f"{sample}: the WAV data is truncated (the file ends before its data chunk does)")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, ValueError) as exc:  # soundfile's errors are RuntimeErrors
        reason = str(exc).split(": ", 1)[-1].strip().removeprefix("Error : ").rstrip(".") or type(exc).__name__
        raise UserError(f"{sample}: cannot decode the audio ({reason})") from None
    if samples.shape[0] == 0:
        raise UserError(f"{sample}: the audio holds no samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    return Clip(np.ascontiguousarray(mono, dtype=np.float32), int(rate))


def resample(clip: Clip, rate: int, sample: str) -> Clip:
    """``clip`` at ``rate`` Hz (soxr, high quality); the same clip when the rates already agree.

    Raises:
        UserError: naming ``sample``, when soxr cannot convert between the two rates.
    """
    if clip.sample_rate == rate:
        return clip
    import soxr

    try:
        samples = soxr.resample(clip.samples, clip.sample_rate, rate, quality="HQ")
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"{sample}: cannot resample {clip.sample_rate} Hz audio to {rate} Hz ({exc})") from None
    if len(samples) == 0:
        raise UserError(f"{sample}: {len(clip.samples)} samples at {clip.sample_rate} Hz are none at {rate} Hz")
    return Clip(np.ascontiguousarray(samples, dtype=np.float32), rate)


def audio_bytes(cell: Any, corpus_file: str | None, sample: str) -> bytes:
    """The file bytes a cell stands for: its ``bytes``, else the file at its ``path`` (relative paths
    from ``corpus_file``'s folder; with no corpus file, as in a shard, a relative path is an error).

    Raises:
        UserError: naming ``sample``: a null cell, a struct with neither, or a path that cannot be read.
    """
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return bytes(cell["bytes"])
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if not isinstance(cell, str) or not cell:
        raise UserError(f"{sample}: the audio cell holds neither bytes nor a path")
    if is_uri(cell) or cell.startswith("/"):
        location = Location.of(cell)
    elif corpus_file is None:
        raise UserError(f"{sample}: the audio cell is the relative path {cell!r}, and shard rows have no corpus file to "
                        "resolve it from; generate from a corpus that holds the audio bytes or absolute paths")
    else:
        location = Location.of(corpus_file).parent / cell
    try:
        return location.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{sample}: audio file {location} does not exist") from None
    except StoreError as exc:  # the store's own line, told about this sample
        raise UserError(f"{sample}: {exc}") from None
    except OSError as exc:
        raise UserError(f"{sample}: cannot read audio file {location} ({exc.strerror or exc})") from None


def read_clip(cell: Any, corpus_file: str, sample: str, rate: int) -> Clip:
    """A cell decoded, mixed to mono and resampled to ``rate``: what the teacher is given."""
    return resample(decode_audio(audio_bytes(cell, corpus_file, sample), sample), rate, sample)
