"""Noise for the corpus: white, pink (1/f power) and babble (a sum of other voices), and mixing at an
exact signal-to-noise ratio.

SNR is measured over the whole utterance: 10 log10(sum speech^2 / sum scaled_noise^2), on the float
signals before any quantisation; ``mix`` scales the noise to hit it exactly, and ``snr_db`` measures it.
"""

from __future__ import annotations

import numpy as np


def white(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose power falls as 1/f (amplitude 1/sqrt(f)), shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spectrum.size, dtype=np.float64)
    f[0] = 1.0
    return np.fft.irfft(spectrum / np.sqrt(f), n)


def babble(n: int, voices: list[np.ndarray], rng: np.random.Generator, talkers: int = 4) -> np.ndarray:
    """A sum of ``talkers`` utterances from ``voices`` (each looped to length ``n`` from a random offset),
    each normalised to unit power first so that no talker dominates."""
    if not voices:
        raise ValueError("babble needs at least one voice")
    out = np.zeros(n)
    for k in rng.choice(len(voices), size=min(talkers, len(voices)), replace=False):
        voice = np.asarray(voices[k], np.float64)
        voice = voice / max(np.sqrt(np.mean(voice ** 2)), 1e-12)
        start = int(rng.integers(voice.size))
        out += np.resize(np.roll(voice, -start), n)
    return out


def snr_db(speech: np.ndarray, noise: np.ndarray) -> float:
    """10 log10 of speech power over noise power."""
    return float(10 * np.log10(np.sum(np.square(speech, dtype=np.float64)) / np.sum(np.square(noise, dtype=np.float64))))


def mix(speech: np.ndarray, noise: np.ndarray, snr: float) -> tuple[np.ndarray, np.ndarray]:
    """(speech + scaled noise, scaled noise): the noise (same length as the speech) scaled so that the
    mixture's SNR is ``snr`` dB. The caller keeps the mixture's peak in range (``fit_int16``)."""
    speech = np.asarray(speech, np.float64)
    noise = np.asarray(noise, np.float64)
    if speech.shape != noise.shape:
        raise ValueError(f"speech {speech.shape} and noise {noise.shape} differ in length")
    p_speech, p_noise = np.sum(speech ** 2), np.sum(noise ** 2)
    if p_speech <= 0 or p_noise <= 0:
        raise ValueError("speech and noise must both have power")
    scaled = noise * np.sqrt(p_speech / (p_noise * 10 ** (snr / 10)))
    return speech + scaled, scaled


def brown(n: int, rng: np.random.Generator) -> np.ndarray:
    """Brown (1/f^2 power) noise: integrated white noise, its mean removed."""
    walk = np.cumsum(rng.standard_normal(n))
    return walk - walk.mean()


def fit_int16(signal: np.ndarray, peak: float = 0.95) -> tuple[np.ndarray, float]:
    """(int16 samples, gain): the signal (in int16 units) times ``gain`` <= 1, chosen so that its peak is
    at most ``peak`` of full scale, rounded. Scaling the mixture as a whole keeps its SNR."""
    top = float(np.max(np.abs(signal))) if signal.size else 0.0
    gain = min(1.0, peak * 32767 / top) if top > 0 else 1.0
    return np.round(signal * gain).astype(np.int16), gain
