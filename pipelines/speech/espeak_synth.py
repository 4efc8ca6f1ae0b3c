"""Speech synthesis with espeak-ng through the ``espeakng-loader`` wheel's ``libespeak-ng`` (ctypes).

``Espeak().say(text, voice, rate, pitch)`` returns int16 samples at ``Espeak.sample_rate`` (22,050 Hz).
Voices are ``<dialect>+<variant>`` names (``en-us+f3``), as ``espeak-ng -v`` takes them. The library
holds global state: one ``Espeak`` per process.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_CHARS_UTF8 = 1
ESPEAK_RATE, ESPEAK_PITCH, ESPEAK_RANGE = 1, 3, 4
POS_CHARACTER = 1

DIALECTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "adam", "Alex", "Andy", "boris", "david", "edward", "iven", "john", "linda", "max",
            "michel", "norbert", "paul", "quincy", "robert", "steph", "travis", "victor", "Annie", "belinda")


class _Event(ctypes.Structure):
    class _Id(ctypes.Union):
        _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _Id)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class Espeak:
    """The espeak-ng library, initialised for synchronous retrieval of the samples."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed with data {espeakng_loader.get_data_path()}")
        self.sample_rate = rate
        self.variants = {p.name for p in (Path(espeakng_loader.get_data_path()) / "voices" / "!v").iterdir()}
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept alive as long as the library may call it
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, count, events) -> int:  # noqa: ANN001 - ctypes pointers
        if wav and count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def say(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
        """int16 samples of ``text`` spoken by ``voice`` at ``rate`` words per minute and base ``pitch`` (0-100)."""
        variant = voice.partition("+")[2]
        if (variant and variant not in self.variants) or self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")  # (it takes an unknown +variant silently)
        self.lib.espeak_SetParameter(ESPEAK_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(ESPEAK_PITCH, int(pitch), 0)
        self._chunks = []
        data = text.encode() + b"\0"
        status = self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed ({status}) on {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
