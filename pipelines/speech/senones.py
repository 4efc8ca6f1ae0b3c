"""Senones of a Sphinx acoustic model: its binary model definition (``mdef``) read directly, the
senone-to-base-phone map, and the phone error rate over frame senone sequences.

The map: a senone belongs to the base (context-independent) phone of the phones whose HMM states use
it. Where one senone is tied across triphones of different base phones (cross-phone tying), it goes to
the first phone in ``mdef`` order that uses it, the rule PocketSphinx's own ``bin_mdef_read`` applies
(its ``sen2cimap``); ``Mdef.shared`` lists those senones so that a report can say how many there are.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BIN_MDEF_MAGIC = b"BMDF"


@dataclass
class Mdef:
    """The parts of a binary ``mdef`` the targets need."""

    ciphones: list[str]
    n_ci_sen: int
    n_sen: int
    n_emit_state: int
    base: np.ndarray  # int [n_phone]: base (CI) phone id of each phone (itself for CI phones)
    filler: np.ndarray  # bool [n_ciphone]
    states: list[np.ndarray]  # senone ids of each phone's emitting states
    senone_phone: np.ndarray = field(init=False)  # int [n_sen]: base phone id of each senone
    shared: list[int] = field(init=False)  # senones used by phones of more than one base phone

    def __post_init__(self) -> None:
        owner = np.full(self.n_sen, -1, np.int64)
        shared: set[int] = set()
        for phone, senones in enumerate(self.states):
            ci = int(self.base[phone])
            for senone in senones.tolist():
                if owner[senone] == -1:
                    owner[senone] = ci
                elif owner[senone] != ci:
                    shared.add(senone)
        if (owner < 0).any():
            raise ValueError(f"mdef: senones {np.flatnonzero(owner < 0)[:5].tolist()} are used by no phone")
        self.senone_phone = owner
        self.shared = sorted(shared)

    def phone_names(self, senones) -> list[str]:  # noqa: ANN001 - a sequence of senone ids
        """The base phone name of each senone."""
        return [self.ciphones[int(p)] for p in self.senone_phone[np.asarray(senones, np.int64)]]


def read_mdef(path: str | Path) -> Mdef:
    """Parse a PocketSphinx binary model definition (the layout ``bin_mdef_write`` writes)."""
    data = Path(path).read_bytes()
    if data[:4] == BIN_MDEF_MAGIC:
        order = "<" if struct.unpack("<i", data[4:8])[0] == 1 else ">"
    elif data[:4] == BIN_MDEF_MAGIC[::-1]:
        order = ">" if struct.unpack(">i", data[4:8])[0] == 1 else "<"
    else:
        raise ValueError(f"{path}: not a binary mdef (no BMDF marker)")
    (version, desc_len) = struct.unpack(order + "ii", data[4:12])
    if version != 1:
        raise ValueError(f"{path}: binary mdef version {version}, expected 1")
    offset = 12 + desc_len
    (n_ciphone, n_phone, n_emit_state, n_ci_sen, n_sen, _n_tmat, n_sseq, _n_ctx, n_cd_tree, _sil) = struct.unpack(
        order + "10i", data[offset:offset + 40])
    offset += 40
    names = []
    for _ in range(n_ciphone):
        end = data.index(b"\0", offset)
        names.append(data[offset:end].decode())
        offset = end + 1
    offset = (offset - (12 + desc_len + 40) + 3) // 4 * 4 + (12 + desc_len + 40)  # padded from the names' start
    offset += 8 * n_cd_tree
    phones = np.frombuffer(data, np.dtype([("ssid", order + "i4"), ("tmat", order + "i4"), ("info", "u1", (4,))]),
                           count=n_phone, offset=offset)
    offset += 12 * n_phone
    (sseq_size,) = struct.unpack(order + "i", data[offset:offset + 4])
    offset += 4
    flat = np.frombuffer(data, order + "u2", count=sseq_size, offset=offset).astype(np.int64)
    offset += 2 * sseq_size
    if n_emit_state:
        if sseq_size != n_sseq * n_emit_state:
            raise ValueError(f"{path}: {sseq_size} senone-sequence entries for {n_sseq} x {n_emit_state}")
        sseqs = [flat[i * n_emit_state:(i + 1) * n_emit_state] for i in range(n_sseq)]
    else:
        lengths = np.frombuffer(data, "u1", count=n_sseq, offset=offset).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        sseqs = [flat[s:s + n] for s, n in zip(starts, lengths)]
    base = np.arange(n_phone)
    base[n_ciphone:] = phones["info"][n_ciphone:, 1]
    if (base < 0).any() or (base >= n_ciphone).any():
        raise ValueError(f"{path}: a triphone names a base phone outside the {n_ciphone} CI phones")
    if (flat >= n_sen).any():
        raise ValueError(f"{path}: a senone id at or above n_sen {n_sen}")
    return Mdef(ciphones=names, n_ci_sen=n_ci_sen, n_sen=n_sen, n_emit_state=n_emit_state, base=base,
                filler=phones["info"][:n_ciphone, 0].astype(bool), states=[sseqs[s] for s in phones["ssid"]])


def collapse(sequence) -> list:  # noqa: ANN001 - any sequence
    """Runs of equal neighbours reduced to one element."""
    out: list = []
    for item in sequence:
        if not out or out[-1] != item:
            out.append(item)
    return out


def edit_distance(ref, hyp) -> int:  # noqa: ANN001 - sequences
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def phone_errors(reference_phones, senones, mdef: Mdef, ignore=("SIL",)) -> tuple[int, int]:  # noqa: ANN001
    """(edit distance, reference length) between a reference phone sequence and frame senones mapped to
    base phones with repeats collapsed; phones in ``ignore`` (silence) are removed from both first."""
    ref = [p for p in collapse(reference_phones) if p not in ignore]
    hyp = [p for p in collapse(mdef.phone_names(senones)) if p not in ignore]
    return edit_distance(ref, hyp), len(ref)


def phone_error_rate(pairs, mdef: Mdef) -> float:  # noqa: ANN001 - iterable of (reference phones, senones)
    """Corpus phone error rate: summed edit distances over summed reference lengths."""
    errors = total = 0
    for reference, senones in pairs:
        e, n = phone_errors(reference, senones, mdef)
        errors, total = errors + e, total + n
    return errors / total if total else 0.0
