"""Raw text and chat corpora: documents tokenized and cut into windows in the reader stage.

``generate --text-column NAME --max-length N`` tokenizes each document with the teacher's tokenizer
(or ``--tokenizer hf:DIR``) exactly as ``tokenizer(text)`` does, BOS included when the tokenizer adds
one and no EOS appended, then cuts the ids into windows of at most N tokens: window w holds ids
[w*N, (w+1)*N), so a document's windows, concatenated, are its ids, and no window mixes documents.
A window's sample id is ``<document id>#<w>``. With ``--pack`` the documents of a unit are joined
(each followed by EOS) and cut into full windows instead, named ``<first document id of the unit>#pack<w>``;
packing stays inside a unit so that resume remains exact.

``--chat-column NAME`` (a list of {role, content} messages) applies the tokenizer's chat template.
Targets are stored only at the positions a student is trained on: position p of a window is a target
when token p + 1 is an assistant token, the next-token convention of causal LMs. Assistant tokens are
those the template's ``{% generation %}`` blocks mark (``return_assistant_tokens_mask``); for templates
without them, each assistant message's tokens are the difference between the conversation rendered up to
that message and the prompt before it (``add_generation_prompt=True``), end-of-turn tokens included.
Windows without any target are dropped.

The output table has ``sample_id``, ``input_ids`` (list<int32>: the ids the teacher sees) and, for chat,
``target_positions`` (list<int32>, ascending): the window positions whose soft labels the row stores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .corpus import Corpus, Unit
from .errors import UserError
from .hf import import_transformers
from .inputs import PROBE_ROWS, ColumnsKind
from .schema import ID_COLUMN, TARGETS_COLUMN, TOKENS_COLUMN
from .storage import sha256_named_files

__all__ = ["TokenizerSource", "DocumentWindows", "DocumentsKind", "load_tokenizer", "tokenizer_identity"]

PROBE_DOCUMENTS = 64
"""Documents the vocabulary probe reads at most to find its first windows."""

GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class TokenizerSource:
    """Where a tokenizer comes from: a directory (tokenizer files, or one ``.gguf``) and the flag naming it."""

    path: Path
    flag: str
    spec: str

    @classmethod
    def of(cls, spec: str, flag: str) -> "TokenizerSource":
        if not spec.startswith("hf:"):
            raise UserError(f"{flag} {spec}: a tokenizer comes from an hf:DIR (a directory with tokenizer files or a .gguf)")
        path = Path(spec[len("hf:"):].partition("@")[0])
        if path.is_file():
            path = path.parent
        if not path.is_dir():
            raise UserError(f"{flag} {spec}: {path} does not exist")
        return cls(path, flag, spec)

    def files(self) -> list[Path]:
        ggufs = sorted(self.path.glob("*.gguf"))
        own = [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]
        return own or ggufs


def tokenizer_identity(source: TokenizerSource) -> str:
    """sha256 over the tokenizer's files (names and bytes), in a fixed order."""
    return sha256_named_files(source.files())


def load_tokenizer(source: TokenizerSource) -> Any:
    """The transformers tokenizer of ``source``, from local files only."""
    AutoTokenizer = import_transformers().AutoTokenizer
    files = source.files()
    if not files:
        raise UserError(f"{source.flag} {source.spec}: {source.path} holds no tokenizer files (tokenizer.json, ...) and no .gguf")
    try:
        if files[0].suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(source.path), gguf_file=files[0].name)
        return AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{source.flag} {source.spec}: cannot load the tokenizer ({first})") from None


def _ids_list(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return list(ids)


@dataclass
class DocumentWindows:
    """Turns a unit's documents (``sample_id`` + the text or chat column) into token windows.

    Attributes:
        tokenizer: a transformers tokenizer.
        column: the text or chat column.
        chat: the column holds conversations (list of {role, content}).
        max_length: N, the most tokens a window holds.
        pack: join a unit's documents (each followed by EOS) into full windows.
    """

    tokenizer: Any
    column: str
    chat: bool
    max_length: int
    pack: bool = False

    def check_column_type(self, data_type: pa.DataType) -> None:
        """Refuse a column of the wrong type, naming the flag."""
        if self.chat:
            inner = data_type.value_type if pa.types.is_list(data_type) or pa.types.is_large_list(data_type) else None
            if inner is None or not pa.types.is_struct(inner) or not {"role", "content"} <= {f.name for f in inner}:
                raise UserError(f"--chat-column {self.column!r} has type {data_type}; expected a list of {{role, content}} messages")
        elif not (pa.types.is_string(data_type) or pa.types.is_large_string(data_type)):
            raise UserError(f"--text-column {self.column!r} has type {data_type}; expected strings")

    def __call__(self, table: pa.Table) -> pa.Table:
        """[documents] -> [windows]: ``sample_id``, ``input_ids`` and, for chat, ``target_positions``."""
        sample_ids = table.column(ID_COLUMN).to_pylist()
        column = table.column(self.column)
        if column.null_count:
            bad = [i for i, v in zip(sample_ids, column.is_null().to_pylist()) if v][:5]
            flag = "--chat-column" if self.chat else "--text-column"
            raise UserError(f"{flag} {self.column!r} is null for sample ids {', '.join(bad)}")
        if self.chat:
            documents = [self._conversation(sample_id, messages) for sample_id, messages in zip(sample_ids, column.to_pylist())]
        else:
            encoded = self.tokenizer(column.to_pylist())["input_ids"] if len(sample_ids) else []
            documents = [(list(ids), None) for ids in encoded]
        if self.pack:
            return self._packed(sample_ids, documents)
        return self._windows(sample_ids, documents)

    def _conversation(self, sample_id: str, messages: list[dict[str, Any]]) -> tuple[list[int], np.ndarray]:
        """(ids of the whole conversation, bool [len] True at assistant tokens)."""
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        template = self.tokenizer.chat_template or ""
        try:
            if GENERATION_BLOCK.search(template):
                encoded = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
                return list(encoded["input_ids"]), np.asarray(encoded["assistant_masks"], dtype=bool)
            ids = _ids_list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True))
            assistant = np.zeros(len(ids), dtype=bool)
            for index, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                prompt = _ids_list(self.tokenizer.apply_chat_template(messages[:index], tokenize=True, return_dict=True,
                                                                      add_generation_prompt=True)) if index else []
                upto = _ids_list(self.tokenizer.apply_chat_template(messages[: index + 1], tokenize=True, return_dict=True))
                if upto[: len(prompt)] != prompt or ids[: len(upto)] != upto:
                    raise UserError(f"--chat-column {self.column!r}, sample id {sample_id}: the chat template does not render "
                                    "a conversation as the prefix of its continuation; use a template with {% generation %} blocks")
                assistant[len(prompt): len(upto)] = True
            return ids, assistant
        except UserError:
            raise
        except Exception as exc:  # the template rejected the messages (roles, missing fields)
            raise UserError(f"--chat-column {self.column!r}, sample id {sample_id}: the chat template failed: {type(exc).__name__}: {exc}") from None

    def _windows(self, sample_ids: list[str], documents: list[tuple[list[int], np.ndarray | None]]) -> pa.Table:
        names: list[str] = []
        windows: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        size = self.max_length
        for sample_id, (token_list, assistant) in zip(sample_ids, documents):
            ids = np.asarray(token_list, dtype=np.int32)
            for window, begin in enumerate(range(0, len(ids), size)):
                piece = ids[begin: begin + size]  # a view of the document's int32 ids
                if assistant is not None:
                    # position p is a target when token p + 1 (possibly the next window's first) is an assistant token
                    following = assistant[begin + 1: begin + len(piece) + 1]
                    positions = np.flatnonzero(following).astype(np.int32)
                    if not len(positions):
                        continue
                    targets.append(positions)
                names.append(f"{sample_id}#{window}")
                windows.append(piece)
        return self._table(names, windows, targets if self.chat else None)

    def _packed(self, sample_ids: list[str], documents: list[tuple[list[int], np.ndarray | None]]) -> pa.Table:
        eos = self.tokenizer.eos_token_id
        stream: list[int] = []
        assistant_stream: list[np.ndarray] = []
        for ids, assistant in documents:
            stream.extend(ids + ([eos] if eos is not None else []))
            if assistant is not None:
                assistant_stream.append(np.concatenate([assistant, np.zeros(int(eos is not None), dtype=bool)]))
        assistant_all = np.concatenate(assistant_stream) if assistant_stream else None
        first = sample_ids[0] if sample_ids else "empty"
        table = self._windows([first], [(stream, assistant_all)])
        names = [name.replace(f"{first}#", f"{first}#pack", 1) for name in table.column(ID_COLUMN).to_pylist()]
        return table.set_column(0, ID_COLUMN, pa.array(names, pa.string()))

    def _table(self, names: list[str], windows: list[np.ndarray], targets: list[np.ndarray] | None) -> pa.Table:
        offsets = np.zeros(len(windows) + 1, dtype=np.int32)
        np.cumsum([len(w) for w in windows], out=offsets[1:])
        flat = np.concatenate(windows) if windows else np.zeros(0, dtype=np.int32)
        arrays = [pa.array(names, pa.string()), pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))]
        fields = [ID_COLUMN, TOKENS_COLUMN]
        if targets is not None:
            target_offsets = np.zeros(len(targets) + 1, dtype=np.int32)
            np.cumsum([len(t) for t in targets], out=target_offsets[1:])
            flat_targets = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int32)
            arrays.append(pa.ListArray.from_arrays(pa.array(target_offsets), pa.array(flat_targets, pa.int32())))
            fields.append(TARGETS_COLUMN)
        return pa.Table.from_arrays(arrays, names=fields)


class DocumentsKind(ColumnsKind):
    """The input kind of --text-column and --chat-column corpora: a unit's documents become token windows
    in the reader stage (``DocumentWindows``), which then reach the teacher as a token column does.
    Progress counts documents, not windows."""

    counts_documents = True

    def __init__(self, documents: DocumentWindows, column: str, batch_size: int, tokenizer_flag: str, settings: dict[str, Any],
                 batch_positions: int | None = None) -> None:
        super().__init__(column, batch_size, batch_positions)
        self.documents, self.tokenizer_flag, self.recorded = documents, tokenizer_flag, settings

    def settings(self) -> dict[str, Any]:
        """The text or chat column, --max-length, --pack and the tokenizer's name and sha256."""
        return self.recorded

    def check_column(self, schema: pa.Schema) -> None:
        self.documents.check_column_type(schema.field(self.documents.column).type)

    def read_unit(self, corpus: Corpus, unit: Unit, table: pa.Table) -> pa.Table:
        """The unit's token windows (by length with ``--batch-positions``)."""
        return self.by_length(self.documents(table))

    def probe_table(self, corpus: Corpus) -> pa.Table:
        """The first windows of the first documents (at most ``PROBE_DOCUMENTS`` read).

        Raises:
            UserError: none of them gives a window to distil.
        """
        read = 0
        for unit in corpus.units:  # whole units: a JSONL unit is read from its own byte range
            rows = min(unit.rows, PROBE_DOCUMENTS - read)
            windows = self.documents(corpus.read_unit(Unit(unit.index, unit.file_index, unit.start, unit.start + rows)))
            if windows.num_rows:
                return windows.slice(0, PROBE_ROWS)
            read += rows
            if read >= PROBE_DOCUMENTS:
                break
        raise UserError(f"{'--chat-column' if self.documents.chat else '--text-column'} {self.documents.column!r}: the first {read} documents "
                        "give no window to distil (empty texts, or conversations without an assistant message)")

    def check_vocab(self, vocab_size: int) -> None:
        """The tokenizer's ids must be classes of the teachers."""
        if len(self.documents.tokenizer) > vocab_size:
            raise UserError(f"{self.tokenizer_flag}: the tokenizer has {len(self.documents.tokenizer)} tokens but the teachers "
                            f"emit {vocab_size} classes; use the teachers' own tokenizer")
