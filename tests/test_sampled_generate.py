"""``generate --targets sample`` end to end: the shards, their invariance, the loader, the loss and the tools.

What is shown, each against an independent computation:
* the stored draws are the teacher's: the teacher's log-probabilities recomputed here (float64, the
  ensemble combined by hand) give, through ``draw_targets`` on the same keys, exactly the stored ids
  and counts; the stored log-probabilities and log normalisers equal the recomputed ones within the
  codec's bound; pooled over every position the stored draws pass a chi-square test against the
  teacher and fail it against a wrong distribution; confidence, entropy and agreement are the dense ones;
* byte-identical shards (manifest sha256) from a kill -9 and resume, from 2 torchrun ranks and from
  another ``--batch-size``, against one uninterrupted run (the teacher is a lookup table, so its
  logits do not depend on the batch a row falls in);
* chat corpora: draws keyed by each target's index among the row's stored positions, scattered by
  the loader to the right positions of the input;
* the loader's batches hold the stored draws of their rows; train-student's loss on a batch is the
  RS-KD estimate written out by hand from the stored columns; top-k and sampled directories mix;
* verify, seal, select, inspect, Polars and DuckDB read sampled directories; the refusals are one line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats
from torch import nn

from conftest import REPO, interrupt_after, read_output, run_cli, run_cli_subprocess, save_teacher, shard_paths, token_table, write_parquet
from slow_teachers import Slow
from softlabels.codec import LogprobCodec
from softlabels.targets.sampled import targets_from_arrow
from softlabels.targets.sampling import SAMPLER, draw_targets, position_keys

VOCAB = 97
SAMPLES = 12
PROPOSAL = 1.5
ROWS = 117


class BigramTeacher(nn.Module):
    """logits[b, t] = table[x[b, t]]: a lookup, so a position's logits are exact whatever its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCAB, VOCAB) * 3.0)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.table[x]


def bigram_teacher() -> nn.Module:
    return BigramTeacher()


def slow_bigram_teacher() -> nn.Module:
    return Slow(BigramTeacher())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}


def _args(corpus: Path, teachers: list[str], out: Path, *extra: object) -> list[str]:
    args = ["generate", str(corpus), "--out", str(out), "--id-column", "id", "--rows-per-shard", "25", "--batch-size", "7",
            "--no-progress", "--targets", "sample", "--samples", str(SAMPLES), "--proposal-temperature", str(PROPOSAL)]
    for spec in teachers:
        args += ["--teacher", spec]
    return args + [str(e) for e in extra]


def _hashes(out: Path) -> list[tuple[str, str]]:
    return [(s["file"], s["sha256"]) for s in json.loads((out / "manifest.json").read_text())["shards"]]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _teacher_table(spec: str) -> torch.Tensor:
    """The bigram table of a saved teacher SPEC, read from its safetensors file (not through softlabels)."""
    from safetensors.torch import load_file

    weights = load_file(spec.split("@", 1)[1])
    return next(v for k, v in weights.items() if k.endswith("table")).double()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("sampled")
    corpus = write_parquet(token_table(ROWS, seed=4, vocab=VOCAB), root / "tokens.parquet")
    slow = save_teacher("test_sampled_generate:slow_bigram_teacher", 3, root / "slow.safetensors")
    fast = [save_teacher("test_sampled_generate:bigram_teacher", seed, root / f"bigram{seed}.safetensors") for seed in (5, 6)]
    straight = root / "straight"
    result = run_cli(*_args(corpus, [slow], straight))
    assert result.code == 0, result.err
    return {"root": root, "corpus": corpus, "slow": slow, "fast": fast, "straight": straight}


# -- the stored draws are the teacher's ------------------------------------------------------------


@pytest.mark.parametrize("teachers, proposal, dtype", [(2, 1.0, "bfloat16"), (1, PROPOSAL, "float16"), (1, 1.0, "uint8")],
                         ids=["ensemble-t1-bf16", "single-t1.5-fp16", "single-t1-uint8"])
def test_stored_draws_are_the_teachers(tmp_path, setup, teachers, proposal, dtype):
    specs = setup["fast"][:teachers]
    out = tmp_path / "out"
    result = run_cli("generate", setup["corpus"], "--out", out, "--id-column", "id", "--rows-per-shard", 40, "--batch-size", 9,
                     "--no-progress", "--targets", "sample", "--samples", SAMPLES, "--proposal-temperature", proposal,
                     "--logprob-dtype", dtype, *[a for s in specs for a in ("--teacher", s)])
    assert result.code == 0, result.err
    manifest = _manifest(out)
    assert (manifest["targets"], manifest["samples"], manifest["proposal_temperature"], manifest["sampler"]) == ("sample", SAMPLES, proposal, SAMPLER)
    assert "top_k" not in manifest and manifest["settings"]["samples"] == SAMPLES

    table = read_output(out)
    tokens = table.column("inputs").to_pylist()
    lengths = [len(t) for t in tokens]
    flat = torch.tensor([t for row in tokens for t in row])
    members = [torch.log_softmax(_teacher_table(spec)[flat], dim=-1) for spec in specs]  # float64 [P, V]
    reference = members[0] if teachers == 1 else torch.logsumexp(torch.stack(members), dim=0) - math.log(teachers)

    codec = LogprobCodec.from_header(manifest)
    stored = targets_from_arrow(table, SAMPLES, proposal, codec)
    keys = position_keys(manifest["fingerprint"], table.column("sample_id").to_pylist(), torch.tensor(lengths))
    expected = draw_targets(reference.float(), keys, SAMPLES, proposal)
    assert torch.equal(stored.offsets, expected.offsets)
    assert torch.equal(stored.ids, expected.ids) and torch.equal(stored.counts, expected.counts)
    assert manifest["totals"]["positions"] == sum(lengths) == stored.positions
    rows_of = torch.repeat_interleave(torch.arange(stored.positions), stored.unique_per_position())
    truth = reference[rows_of, stored.ids]
    bound = codec.error_bound(truth.float()).double() + 1e-6
    assert bool(((stored.logprobs.double() - truth).abs() <= bound).all())
    if proposal != 1.0:
        torch.testing.assert_close(stored.log_normalizer.double(), torch.logsumexp(reference / proposal, dim=-1), rtol=0, atol=1e-5)

    # pooled over every position: the draws follow the proposal, and a wrong distribution is rejected
    counts = torch.bincount(stored.ids, weights=stored.counts.double(), minlength=VOCAB).numpy()

    def p_value(temperature: float) -> float:
        expected_counts = torch.softmax(reference / temperature, dim=-1).sum(dim=0).numpy() * SAMPLES
        small = expected_counts < 5  # merged into one bin
        observed, expected_bins = counts[~small], expected_counts[~small]
        if small.any():
            observed, expected_bins = np.append(observed, counts[small].sum()), np.append(expected_bins, expected_counts[small].sum())
        return float(stats.chisquare(observed, expected_bins).pvalue)

    assert p_value(proposal) > 1e-3
    assert p_value(proposal * 1.3) < 1e-6

    # statistics columns: the full distribution's, averaged per row
    probs = reference.exp()
    row_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    per_row = torch.zeros(len(lengths), dtype=torch.float64)
    count = torch.tensor(lengths, dtype=torch.float64)
    confidence = per_row.index_add(0, row_of, probs.max(dim=-1).values) / count
    entropy = per_row.index_add(0, row_of, -(probs * reference).sum(dim=-1)) / count
    np.testing.assert_allclose(table.column("confidence").to_numpy(), confidence.numpy(), atol=1e-5)
    np.testing.assert_allclose(table.column("entropy").to_numpy(), entropy.numpy(), atol=1e-4)
    if teachers > 1:
        best = reference.argmax(dim=-1)
        agree = torch.stack([m.argmax(dim=-1) == best for m in members]).double().mean(dim=0)
        np.testing.assert_allclose(table.column("agreement").to_numpy(), (per_row.index_add(0, row_of, agree) / count).numpy(), atol=1e-6)
    # the fidelity report: distinct ids and the teacher mass they hold
    fidelity = manifest["fidelity"]
    assert fidelity["unique_ids_mean"] == pytest.approx(len(stored.ids) / stored.positions)
    assert fidelity["drawn_mass_mean"] == pytest.approx(float(truth.exp().sum() / stored.positions), rel=1e-5)
    assert "kl_full_vs_stored_mean" not in fidelity and f"{fidelity['unique_ids_mean']:.2f}" in result.out


def test_rows_skipped_for_non_finite_outputs_leave_the_others_draws_keyed_by_their_own_ids(tmp_path, setup):
    """--on-nonfinite skip drops rows holding NAN_TOKEN; every kept row's draws are those of its own key."""
    from fixture_teachers import NAN_TOKEN

    from softlabels.loading import load_model

    out = tmp_path / "out"
    result = run_cli("generate", setup["corpus"], "--out", out, "--id-column", "id", "--rows-per-shard", 30, "--batch-size", 8,
                     "--no-progress", "--teacher", "fixture_teachers:nonfinite_tokens", "--on-nonfinite", "skip",
                     "--targets", "sample", "--samples", 5)
    assert result.code == 0, result.err
    source = pq.read_table(setup["corpus"])
    dropped = {sid for sid, tokens in zip(source.column("id").to_pylist(), source.column("inputs").to_pylist()) if NAN_TOKEN in tokens}
    table = read_output(out)
    assert dropped and set(table.column("sample_id").to_pylist()) == set(source.column("id").to_pylist()) - dropped
    model, _ = load_model("fixture_teachers:nonfinite_tokens")
    tokens = table.column("inputs").to_pylist()
    with torch.no_grad():
        logprobs = torch.cat([torch.log_softmax(model(torch.tensor([row]), torch.tensor([len(row)]))[0].double(), dim=-1) for row in tokens])
    keys = position_keys(_manifest(out)["fingerprint"], table.column("sample_id").to_pylist(), torch.tensor([len(t) for t in tokens]))
    expected = draw_targets(logprobs.float(), keys, 5)
    stored = targets_from_arrow(table, 5, 1.0, LogprobCodec.from_header(_manifest(out)))
    assert torch.equal(stored.ids, expected.ids) and torch.equal(stored.counts, expected.counts)


def test_a_top_k_run_keeps_its_settings_and_fingerprint_keys(tmp_path, setup):
    """Only sampled runs add settings: a top-k run's fingerprinted settings have no sampling keys."""
    top = tmp_path / "top"
    assert run_cli("generate", setup["corpus"], "--out", top, "--id-column", "id", "--no-progress", "--teacher", setup["fast"][0]).code == 0
    sampled = tmp_path / "sampled"
    assert run_cli("generate", setup["corpus"], "--out", sampled, "--id-column", "id", "--no-progress", "--teacher", setup["fast"][0],
                   "--targets", "sample").code == 0
    top_settings, sampled_settings = _manifest(top)["settings"], _manifest(sampled)["settings"]
    assert not {"targets", "samples", "proposal_temperature", "sampler"} & set(top_settings)
    assert {k: v for k, v in sampled_settings.items() if k not in ("targets", "samples", "proposal_temperature", "sampler", "top_k")} == \
        {k: v for k, v in top_settings.items() if k != "top_k"}
    assert sampled_settings["samples"] == 12 and sampled_settings["proposal_temperature"] == 1.0  # the defaults
    assert _manifest(top)["fingerprint"] != _manifest(sampled)["fingerprint"]
    # the same out with other targets is refused, naming the flag
    again = run_cli("generate", setup["corpus"], "--out", top, "--id-column", "id", "--no-progress", "--teacher", setup["fast"][0],
                    "--targets", "sample")
    assert again.code == 1 and "--targets" in again.err


# -- byte-identical shards -----------------------------------------------------------------------


def test_killed_and_resumed_sampled_run_is_byte_identical(tmp_path, setup):
    out = tmp_path / "resumed"
    command = [sys.executable, "-m", "softlabels.cli", *_args(setup["corpus"], [setup["slow"]], out)]
    killed = interrupt_after(command, 2, signal.SIGKILL, _env())
    assert killed.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()
    rerun = run_cli_subprocess(*_args(setup["corpus"], [setup["slow"]], out))
    assert rerun.returncode == 0, rerun.stderr
    assert "written this run" in rerun.stdout and "5 written" not in rerun.stdout
    assert _hashes(out) == _hashes(setup["straight"])


def test_two_torchrun_ranks_equal_one_process(tmp_path, setup):
    out = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "softlabels.cli", *_args(setup["corpus"], [setup["slow"]], out)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((out / "_journal").glob("rank-*.jsonl"))) == 2
    assert _hashes(out) == _hashes(setup["straight"])


def test_another_batch_size_gives_the_same_shards(tmp_path, setup):
    out = tmp_path / "batch3"
    args = _args(setup["corpus"], [setup["slow"]], out)
    args[args.index("--batch-size") + 1] = "3"
    result = run_cli(*args)
    assert result.code == 0, result.err
    assert _hashes(out) == _hashes(setup["straight"])


# -- chat corpora: keys by stored position, scattered back by the loader ---------------------------


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> dict[str, object]:
    """A word-level tokenizer with a generation-marking chat template and a tiny Llama teacher over it."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "system", "user", "assistant", *[f"w{i}" for i in range(20)]]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + ' <|im_end|>' }}{% endgeneration %}{{ ' ' }}"
        "{% else %}{{ message['content'] + ' <|im_end|> ' }}{% endif %}{% endfor %}")
    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(2)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2.0)
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    rng = np.random.default_rng(9)
    rows = []
    for index in range(19):
        turns = []
        for _ in range(1 + index % 3):
            turns.append({"role": "user", "content": " ".join(f"w{i}" for i in rng.integers(0, 20, int(rng.integers(1, 6))))})
            turns.append({"role": "assistant", "content": " ".join(f"w{i}" for i in rng.integers(0, 20, int(rng.integers(1, 9))))})
        rows.append({"id": f"c{index:02d}", "messages": turns})
    corpus = root / "chat.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"teacher": root / "teacher", "corpus": corpus, "model": model.eval()}


def test_chat_draws_are_keyed_by_stored_position_and_land_at_their_targets(tmp_path, chat):
    from softlabels import SoftLabelDataset

    out = tmp_path / "out"
    result = run_cli("generate", chat["corpus"], "--teacher", f"hf:{chat['teacher']}", "--id-column", "id", "--max-length", 16,
                     "--chat-column", "messages", "--targets", "sample", "--samples", 6, "--rows-per-shard", 5, "--batch-size", 4,
                     "--logprob-dtype", "float16", "--no-progress", "--out", out)
    assert result.code == 0, result.err
    manifest = _manifest(out)
    stored = {r["sample_id"]: r["target_positions"] for r in read_output(out).select(["sample_id", "target_positions"]).to_pylist()}
    seen = 0
    for batch in SoftLabelDataset(out, batch_size=5, shuffle=True, seed=3):
        mask = batch["mask"]
        attention = (torch.arange(batch["inputs"].shape[1])[None, :] < batch["lengths"][:, None]).long()
        with torch.no_grad():
            logprobs = torch.log_softmax(chat["model"](input_ids=batch["inputs"], attention_mask=attention).logits.double(), dim=-1)
        for row, sample_id in enumerate(batch["sample_id"]):
            targets = stored[sample_id]
            assert torch.nonzero(mask[row]).flatten().tolist() == targets
            keys = position_keys(manifest["fingerprint"], [sample_id], [len(targets)])  # index among the stored positions
            expected = draw_targets(logprobs[row, targets].float(), keys, 6).padded(batch["sample_ids"].shape[-1])
            assert torch.equal(batch["sample_ids"][row, targets], expected.ids)
            assert torch.equal(batch["sample_counts"][row, targets], expected.counts)
            torch.testing.assert_close(batch["sample_logprobs"][row, targets], expected.logprobs, rtol=2e-3, atol=1e-4)
            assert not bool(batch["sample_counts"][row][~mask[row]].any())
            seen += len(targets)
    assert seen == manifest["totals"]["positions"] > 0


# -- the loader and the loss ---------------------------------------------------------------------


def test_batches_hold_each_rows_stored_draws(setup):
    from softlabels import SoftLabelDataset, collate

    out = setup["straight"]
    table = read_output(out)
    index = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
    codec = LogprobCodec.from_header(_manifest(out))
    positions = 0
    for batch in SoftLabelDataset(out, batch_size=10, shuffle=True, seed=1):
        width = batch["sample_ids"].shape[-1]
        assert batch["proposal_temperature"] == PROPOSAL and batch["sample_log_normalizer"].shape == batch["mask"].shape
        for row, sample_id in enumerate(batch["sample_id"]):
            stored = targets_from_arrow(table.slice(index[sample_id], 1), SAMPLES, PROPOSAL, codec)
            n = stored.positions
            padded = stored.padded(width)
            assert batch["mask"][row].tolist() == [True] * n + [False] * (batch["mask"].shape[1] - n)
            assert torch.equal(batch["sample_ids"][row, :n], padded.ids) and torch.equal(batch["sample_counts"][row, :n], padded.counts)
            assert torch.equal(batch["sample_logprobs"][row, :n], padded.logprobs)
            assert torch.equal(batch["sample_log_normalizer"][row, :n], stored.log_normalizer)
            assert not bool(batch["sample_counts"][row, n:].any())
            positions += n
        assert "topk_ids" not in batch
    assert positions == _manifest(out)["totals"]["positions"]
    # rows that lost their header (an HF dataset's row dicts) collate to the same batch
    rows = table.slice(3, 6)
    with_header = collate(rows)
    bare = collate(rows.replace_schema_metadata(None).to_pylist(), input_column="inputs", label_column=None, schema=rows.schema.remove_metadata())
    assert bare["proposal_temperature"] == PROPOSAL  # from the log normaliser's field metadata
    for key in ("sample_ids", "sample_counts", "sample_logprobs", "sample_log_normalizer", "mask"):
        assert torch.equal(bare[key], with_header[key]), key


@pytest.mark.parametrize("temperature", [1.0, PROPOSAL])
def test_train_loss_is_the_rs_kd_estimate_of_the_stored_columns(tmp_path, setup, temperature):
    """batch_losses' KD term equals the unbiased estimate written out by hand from the shard columns:
    at T = 1, sum_i (c_i / N) (p_i / q_i) (log p_i - log s_i); at T = t, sum_i (c_i / N) (log q_i - log s_T,i),
    with log q_i = log p_i / t - log Z_t; the mean over positions times T^2."""
    from softlabels.data import SoftLabelDataset
    from softlabels.losses import kd_loss
    from softlabels.options import TrainConfig
    from softlabels.train import batch_losses, student_logits

    out = setup["straight"]
    table = read_output(out)
    index = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
    torch.manual_seed(0)
    student = bigram_teacher()
    config = TrainConfig(data=[str(out)], student="softlabels.models:token_gru", out=str(tmp_path / "s"), alpha=1.0, temperature=temperature)
    batch = next(iter(SoftLabelDataset(out, batch_size=13, shuffle=True, seed=2)))
    with torch.no_grad():
        logits = student_logits(student, batch, torch.device("cpu"))
    terms = batch_losses(logits, batch, config, next_token=True)

    total, count = 0.0, 0
    for row, sample_id in enumerate(batch["sample_id"]):
        shard_row = table.slice(index[sample_id], 1).to_pylist()[0]
        log_s = torch.log_softmax(logits[row].double() / temperature, dim=-1)
        for step, (ids, counts, logp, log_z) in enumerate(zip(shard_row["sample_ids"], shard_row["sample_counts"],
                                                             shard_row["sample_logprobs"], shard_row["sample_log_normalizer"])):
            w = torch.tensor(counts, dtype=torch.float64) / SAMPLES
            log_p = torch.tensor(logp, dtype=torch.float64)
            log_q = log_p / PROPOSAL - log_z
            if temperature == 1.0:
                total += float((w * (log_p - log_q).exp() * (log_p - log_s[step, ids])).sum())
            else:
                total += float((w * (log_q - log_s[step, ids])).sum())
            count += 1
    expected = total / count * temperature**2
    assert float(terms["kd"]) == pytest.approx(expected, rel=1e-5)
    mask = batch["mask"]
    direct = kd_loss(logits, batch["sample_ids"], batch["sample_logprobs"], temperature, mask=mask, targets="sample",
                     sample_counts=batch["sample_counts"], proposal_temperature=PROPOSAL, proposal_log_normalizer=batch["sample_log_normalizer"])
    torch.testing.assert_close(terms["kd"], direct)


def test_train_student_runs_on_sampled_and_mixed_directories(tmp_path, setup):
    top = tmp_path / "top"
    assert run_cli("generate", setup["corpus"], "--out", top, "--id-column", "id", "--rows-per-shard", 25, "--no-progress",
                   "--teacher", setup["slow"], "--top-k", 8).code == 0
    mixed = run_cli("train-student", setup["straight"], "--data", top, "--eval", setup["straight"], "--student", "softlabels.models:token_gru",
                    "--out", tmp_path / "mixed", "--max-steps", 6, "--batch-size", 8, "--temperature", 2, "--no-progress")
    assert mixed.code == 0, mixed.err
    warnings = [line for line in mixed.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("--temperature 2" in w and "1.5" in w for w in warnings)  # DATA_DIR and --eval, not the top-k one
    records = [json.loads(line) for line in (tmp_path / "mixed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["step"] == 6 and all(math.isfinite(r["loss"]) for r in steps)
    assert "eval_kd" in mixed.out
    unbiased = run_cli("train-student", setup["straight"], "--eval", top, "--student", "softlabels.models:token_gru", "--out", tmp_path / "t",
                       "--max-steps", 3, "--batch-size", 8, "--temperature", PROPOSAL, "--no-progress")
    assert unbiased.code == 0, unbiased.err
    assert "warning" not in unbiased.err


# -- the tools -------------------------------------------------------------------------------------


def test_verify_seal_select_inspect_and_clients_read_sampled_directories(tmp_path, setup):
    import duckdb
    import polars as pl

    from softlabels.inspect import inspect

    out = tmp_path / "soft"
    shutil.copytree(setup["straight"], out)
    manifest = _manifest(out)
    table = read_output(out)
    ids = table.column("sample_ids").combine_chunks().flatten()  # one list per position
    unique = _lengths(ids)

    assert run_cli("verify", out).code == 0
    report = inspect(out)
    assert report["targets"] == "sample" and report["samples"] == SAMPLES and report["top_k"] is None
    assert report["unique_ids"]["mean"] == pytest.approx(float(unique.mean()))
    assert report["bytes_per_position"] == pytest.approx(manifest["totals"]["bytes"] / manifest["totals"]["positions"])
    assert 0 < report["soft_label_bytes_per_position"] < report["bytes_per_position"]
    codec = LogprobCodec.from_header(manifest)
    stored = targets_from_arrow(table, SAMPLES, PROPOSAL, codec)
    mass = torch.zeros(stored.positions, dtype=torch.float64).index_add(
        0, torch.repeat_interleave(torch.arange(stored.positions), stored.unique_per_position()), stored.logprobs.double().exp())
    assert report["drawn_mass"]["mean"] == pytest.approx(float(mass.mean()), rel=1e-6)
    assert report["drawn_mass"]["mean"] == pytest.approx(manifest["fidelity"]["drawn_mass_mean"], rel=2e-2)  # stored float16 vs true
    rendered = run_cli("inspect", out)
    assert rendered.code == 0 and f"{SAMPLES} draws (proposal temperature {PROPOSAL:g})" in rendered.out

    # seal rebuilds the same manifest from the journals
    (out / "manifest.json").unlink()
    assert run_cli("seal", out).code == 0
    assert _manifest(out) == manifest

    # Polars and DuckDB read the nested columns as pyarrow does
    files = [str(p) for p in shard_paths(out)]
    frame = pl.read_parquet(files).sort("sample_id")
    assert frame.get_column("sample_ids").to_list() == table.column("sample_ids").to_pylist()
    assert frame.get_column("sample_counts").to_list() == table.column("sample_counts").to_pylist()
    source = f"read_parquet({files!r})"
    positions, draws = duckdb.sql(f"SELECT count(*), sum(list_sum(c)) FROM (SELECT unnest(sample_counts) AS c FROM {source})").fetchall()[0]
    assert positions == manifest["totals"]["positions"] and draws == positions * SAMPLES

    # select keeps whole rows, columns unchanged, and the selection verifies and inspects
    threshold = float(np.median(table.column("confidence").to_numpy()))
    selected = tmp_path / "selected"
    result = run_cli("select", out, "--where", f"confidence > {threshold}", "--out", selected)
    assert result.code == 0, result.err
    kept = read_output(selected)
    expected = table.filter(pc.greater(table.column("confidence"), pa.scalar(threshold, pa.float32())))
    assert kept.num_rows == expected.num_rows > 0
    for name in ("sample_ids", "sample_counts", "sample_logprobs", "sample_log_normalizer"):
        assert kept.column(name).equals(expected.column(name)), name
    assert _manifest(selected)["totals"]["positions"] == int(_lengths(kept.column("sample_ids").combine_chunks()).sum())
    assert run_cli("verify", selected).code == 0
    assert inspect(selected)["unique_ids"]["mean"] > 0

    # a damaged sampled shard is named
    shard = shard_paths(out)[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    damaged = run_cli("verify", out)
    assert damaged.code == 2 and shard.name in damaged.err


def _lengths(lists: pa.Array) -> np.ndarray:
    return pc.list_value_length(lists).to_numpy(zero_copy_only=False)


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, culprit", [
    (["--targets", "sample", "--samples", 0], "--samples"),
    (["--samples", 12], "--samples"),
    (["--targets", "topk", "--samples", 12], "--targets sample"),
    (["--targets", "sample", "--top-k", 5], "--top-k"),
    (["--proposal-temperature", 2], "--proposal-temperature"),
    (["--targets", "sample", "--proposal-temperature", 0], "--proposal-temperature"),
    (["--targets", "samples"], "--targets"),
], ids=["samples-0", "samples-with-default-topk", "samples-with-topk", "top-k-with-sample", "proposal-with-topk", "proposal-0",
        "unknown-targets"])
def test_sampling_misuse_is_one_line_and_writes_nothing(tmp_path, setup, extra, culprit):
    out = tmp_path / "o"
    result = run_cli("generate", setup["corpus"], "--out", out, "--id-column", "id", "--no-progress", "--teacher", setup["fast"][0], *extra)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 1 and len(lines) == 1, result.err
    assert culprit in lines[0] and "Traceback" not in result.err
    assert not out.exists()
