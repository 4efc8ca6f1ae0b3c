"""Hugging Face models: a tiny random Llama saved with save_pretrained as teacher and student."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import read_output, run_cli, token_table, write_parquet

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 97


def _tiny_llama(directory, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("vocab_size", [VOCAB, 128], ids=["exact-vocab", "padded-vocab"])
def test_hf_teacher_equals_a_direct_transformers_forward(tmp_path, vocab_size):
    model = _tiny_llama(tmp_path / "llama", vocab_size)
    corpus = write_parquet(token_table(37, seed=5, vocab=VOCAB), tmp_path / "tokens.parquet")
    result = run_cli("generate", corpus, "--teacher", f"hf:{tmp_path / 'llama'}", "--out", tmp_path / "out",
                     "--id-column", "id", "--top-k", 8, "--rows-per-shard", 10, "--batch-size", 4,
                     "--logprob-dtype", "float16", "--no-progress")  # float16 storage: the 1e-3 tolerance below
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["vocab_size"] == vocab_size  # the logits' real size, padding included
    assert manifest["teachers"][0]["name"] == "hf:llama"  # the folder's name, not its local path
    table = read_output(tmp_path / "out")
    inputs = dict(zip(token_table(37, seed=5, vocab=VOCAB).column("id").to_pylist(),
                      token_table(37, seed=5, vocab=VOCAB).column("inputs").to_pylist()))
    for sample_id, ids, logprobs in zip(table.column("sample_id").to_pylist(), table.column("topk_ids").to_pylist(),
                                        table.column("topk_logprobs").to_pylist()):
        tokens = torch.tensor([inputs[sample_id]])
        with torch.no_grad():
            expected = torch.log_softmax(model(input_ids=tokens).logits[0].double(), dim=-1)
        values, indices = expected.topk(8, dim=-1)
        assert len(ids) == tokens.shape[1]
        got = np.array(logprobs, dtype=np.float64)
        assert np.allclose(got, values.numpy(), atol=1e-3, rtol=1e-3)
        clear = (values[:, :-1] - values[:, 1:]).min(dim=-1).values > 1e-3  # no near-ties: ids must agree
        assert np.array_equal(np.array(ids)[clear.numpy()], indices.numpy()[clear.numpy()])


def test_teacher_student_vocabulary_mismatch_is_a_clear_error(tmp_path):
    _tiny_llama(tmp_path / "teacher", 128)
    corpus = write_parquet(token_table(20, seed=6, vocab=VOCAB), tmp_path / "tokens.parquet")
    assert run_cli("generate", corpus, "--teacher", f"hf:{tmp_path / 'teacher'}", "--out", tmp_path / "soft",
                   "--id-column", "id", "--top-k", 5, "--no-progress").code == 0
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    config.save_pretrained(tmp_path / "student")
    result = run_cli("train-student", tmp_path / "soft", "--student", f"hf:{tmp_path / 'student'}", "--out", tmp_path / "run",
                     "--max-steps", 2, "--no-progress")
    assert result.code == 1 and "97" in result.err and "128" in result.err and "--student" in result.err


def test_hf_config_student_trains_and_rebuilds_from_its_spec(tmp_path):
    _tiny_llama(tmp_path / "teacher", VOCAB)
    corpus = write_parquet(token_table(30, seed=7, vocab=VOCAB), tmp_path / "tokens.parquet")
    assert run_cli("generate", corpus, "--teacher", f"hf:{tmp_path / 'teacher'}", "--out", tmp_path / "soft",
                   "--id-column", "id", "--top-k", 10, "--no-progress").code == 0
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    config.save_pretrained(tmp_path / "student")
    out = tmp_path / "run"
    result = run_cli("train-student", tmp_path / "soft", "--student", f"hf:{tmp_path / 'student'}", "--out", out,
                     "--max-steps", 6, "--batch-size", 8, "--eval", tmp_path / "soft", "--no-progress")
    assert result.code == 0, result.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval_kd" in r][-1]
    assert "eval_perplexity" in final  # next-token labels were derived from the token inputs
    spec = json.loads((out / "student.json").read_text())["spec"]
    assert spec.startswith("hf:") and spec.endswith("student.safetensors")
    # the saved student, rebuilt from its spec, run as a teacher over the same corpus: its top-1 agrees
    # with the teacher's exactly as often as the trainer's evaluation said
    again = run_cli("generate", corpus, "--teacher", spec, "--out", tmp_path / "from_student", "--id-column", "id",
                    "--top-k", 10, "--no-progress")
    assert again.code == 0, again.err
    teacher_top1 = np.concatenate([np.array(r)[:, 0] for r in read_output(tmp_path / "soft").column("topk_ids").to_pylist()])
    student_top1 = np.concatenate([np.array(r)[:, 0] for r in read_output(tmp_path / "from_student").column("topk_ids").to_pylist()])
    assert final["eval_top1_agreement"] == pytest.approx(float((teacher_top1 == student_top1).mean()), abs=1e-9)
