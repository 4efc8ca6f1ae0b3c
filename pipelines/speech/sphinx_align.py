"""Forced alignment with the ``pocketsphinx`` wheel's en-us model: per-10 ms-frame senone ids and the
aligned phone sequence of an utterance (16 kHz int16 audio and its transcript).

Two passes, as PocketSphinx 5 documents: ``set_align_text`` and a decode (word alignment), then
``set_alignment`` and a second decode, whose ``get_alignment`` has words, phones and HMM states, each
state named by its senone id. Tries in order, the first that aligns every word wins (``Alignment.mode``):
  pauses   the transcript with ``<sil>`` where punctuation made the synthesizer pause, no other
           fillers (``fsgusefiller`` off): on 52 synthesized utterances this aligned 47;
           ``plain`` instead when the transcript has no pause;
  fillers  the model's default configuration (optional silence and noise between any words): alone it
           aligned 18 of 32, the word pass mostly ending before the last word or finding no path;
  plain    the words only, no fillers (after the two above, for a transcript with pauses).
An utterance fails (``None``) when no try aligns every word, or when the states do not tile the frames
from 0 without gaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FRAME_RATE = 100  # frames per second (10 ms)


@dataclass
class Alignment:
    senones: np.ndarray  # int32 [frames]
    phones: list[str]  # aligned phone segments in order (SIL included)
    phone_starts: list[int]  # first frame of each phone segment
    words: list[str]  # aligned words (<s>, <sil>, </s> and alternates like and(2) as the decoder names them)
    mode: str  # the try that aligned it: pauses, fillers or plain


def model_dir() -> Path:
    import pocketsphinx

    return Path(pocketsphinx.get_model_path()) / "en-us"


def spoken_words(names) -> list[str]:  # noqa: ANN001 - decoder word names
    """Decoder word names without fillers (<s>, <sil>, </s>, [NOISE] ...) and alternate marks (``and(2)``)."""
    return [n.split("(")[0] for n in names if not n.startswith(("<", "[", "+"))]


class Aligner:
    """PocketSphinx decoders with the model's default configuration (and one without fillers), quiet."""

    def __init__(self) -> None:
        import pocketsphinx

        self.plain = pocketsphinx.Decoder(loglevel="FATAL", fsgusefiller=False)
        self.fillers = pocketsphinx.Decoder(loglevel="FATAL")

    def align(self, samples: np.ndarray, transcript: str) -> Alignment | None:
        """The alignment of 16 kHz int16 ``samples`` to ``transcript`` (dictionary spellings, ``<sil>``
        where a pause is expected), or None."""
        pcm = np.ascontiguousarray(samples, dtype=np.int16).tobytes()
        words = " ".join(spoken_words(transcript.split()))
        if transcript.split() == words.split():  # no pause expected: the plain try comes first
            tries = [(self.plain, words, "plain"), (self.fillers, words, "fillers")]
        else:
            tries = [(self.plain, transcript, "pauses"), (self.fillers, words, "fillers"), (self.plain, words, "plain")]
        for decoder, text, mode in tries:
            result = self._align(decoder, pcm, text, mode)
            if result is not None:
                return result
        return None

    @staticmethod
    def _align(decoder, pcm: bytes, text: str, mode: str) -> Alignment | None:  # noqa: ANN001
        try:
            decoder.set_align_text(text)
            decoder.start_utt()
            decoder.process_raw(pcm, full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
            words = spoken_words(text.split())
            if hyp is None or spoken_words(hyp.hypstr.split()) != words:
                return None
            decoder.set_alignment()
            decoder.start_utt()
            decoder.process_raw(pcm, full_utt=True)
            decoder.end_utt()
            alignment = decoder.get_alignment()
        except RuntimeError:
            try:  # leave the decoder ready for the next utterance
                decoder.end_utt()
            except RuntimeError:
                pass
            return None
        if alignment is None:
            return None
        senones: list[int] = []
        phones, starts = [], []
        for phone in alignment.phones():
            phones.append(phone.name)
            starts.append(phone.start)
            for state in phone:
                if state.start != len(senones) or state.duration <= 0:
                    return None
                senones.extend([int(state.name)] * state.duration)
        if not senones:
            return None
        names = [w.name for w in alignment.words()]
        if spoken_words(names) != words:
            return None
        return Alignment(np.asarray(senones, np.int32), phones, starts, names, mode)
