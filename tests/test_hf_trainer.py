"""``transformers.Trainer`` from soft-label shards (softlabels.hf_trainer).

A tiny random Llama teacher (vocab 300, sharpened so its top-k holds most of the mass) labels 117
ragged token rows and 41 held-out rows with ``softlabels generate``. The Trainer's loss on a batch
is checked against ``kd_loss`` plus next-token CE built by hand from the shard files read with
pyarrow, and against ``train-student``'s ``batch_losses``; 30 Trainer steps lower the held-out KD;
a LoRA (peft) student trains through the same path; sampled shards (N=12 draws, at the teacher and
at proposal temperature 2) train through it with the RS-KD loss.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import token_table, write_parquet

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from softlabels.distributed import autocast
from softlabels.errors import UserError
from softlabels.generate import generate
from softlabels.hf_trainer import (
    SoftLabelCollator,
    SoftLabelTrainer,
    load_soft_label_dataset,
)
from softlabels.losses import kd_loss
from softlabels.options import GenerateConfig

VOCAB = 300
ROWS, HELD_OUT = 117, 41
TOP_K = 8


def llama(seed: int, layers: int = 2, tied: bool = True) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def soft_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("hf_trainer")
    teacher = llama(seed=0, tied=False)
    with torch.no_grad():  # peaked (top-8 mass ~0.8) and mostly a function of the current token: learnable in 30 steps
        teacher.model.norm.weight.mul_(30.0)
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.2)
            layer.mlp.down_proj.weight.mul_(0.2)
    teacher.save_pretrained(work / "teacher")
    corpora = {"train": write_parquet(token_table(ROWS, seed=11, vocab=VOCAB), work / "train.parquet"),
               "heldout": write_parquet(token_table(HELD_OUT, seed=12, vocab=VOCAB), work / "heldout.parquet")}
    found = {}
    for name, corpus, dtype in (("train", corpora["train"], "bfloat16"), ("heldout", corpora["heldout"], "bfloat16"),
                                ("train-uint8", corpora["train"], "uint8")):
        out = work / name
        generate(GenerateConfig(corpus=[str(corpus)], teachers=[f"hf:{work / 'teacher'}"], out=str(out), id_column="id",
                                top_k=TOP_K, rows_per_shard=50, batch_size=16, logprob_dtype=dtype, progress=False))
        found[name] = out
    for name, proposal in (("train-sampled", None), ("train-sampled-t2", 2.0)):
        out = work / name
        generate(GenerateConfig(corpus=[str(corpora["train"])], teachers=[f"hf:{work / 'teacher'}"], out=str(out), id_column="id",
                                targets="sample", samples=12, proposal_temperature=proposal, rows_per_shard=50, batch_size=16,
                                progress=False))
        found[name] = out
    return found


def training_args(out: Path, **overrides: object) -> transformers.TrainingArguments:
    settings: dict[str, object] = {
        "output_dir": str(out), "remove_unused_columns": False, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
        "learning_rate": 5e-3, "lr_scheduler_type": "constant", "logging_steps": 5, "report_to": [], "save_strategy": "no",
        "use_cpu": True, "seed": 0, "disable_tqdm": True, "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def shard_rows(directory: Path, count: int) -> pa.Table:
    """The first ``count`` rows of the directory, read with pyarrow in manifest order."""
    manifest = json.loads((directory / "manifest.json").read_text())
    tables = [pq.read_table(directory / "data" / entry["file"]) for entry in manifest["shards"]]
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables]).slice(0, count)


def targets_by_hand(directory: Path, table: pa.Table) -> dict[str, torch.Tensor]:
    """Padded tokens, top-k targets (codes decoded by the manifest's formula), mask and next tokens, in numpy."""
    manifest = json.loads((directory / "manifest.json").read_text())
    rows = table.to_pylist()
    steps = max(len(row["inputs"]) for row in rows)
    tokens = np.zeros((len(rows), steps), dtype=np.int64)
    ids = np.zeros((len(rows), steps, TOP_K), dtype=np.int64)
    logprobs = np.zeros((len(rows), steps, TOP_K), dtype=np.float64)
    mask = np.zeros((len(rows), steps), dtype=bool)
    next_tokens = np.full((len(rows), steps), -100, dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row["inputs"])
        tokens[i, :n] = row["inputs"]
        ids[i, :n] = row["topk_ids"]
        if manifest["logprob_dtype"] == "uint8":
            logprobs[i, :n] = -(np.asarray(row["topk_logprob_codes"], dtype=np.float64) * manifest["logprob_scale"]) ** 2
        else:
            logprobs[i, :n] = row["topk_logprobs"]
        mask[i, :n] = True
        next_tokens[i, : n - 1] = row["inputs"][1:]
    return {"tokens": torch.from_numpy(tokens), "attention": torch.from_numpy(mask.astype(np.int64)), "ids": torch.from_numpy(ids),
            "logprobs": torch.from_numpy(logprobs).float(), "mask": torch.from_numpy(mask), "next": torch.from_numpy(next_tokens)}


def train_student_loss(directory: Path, count: int, student: torch.nn.Module, temperature: float, alpha: float, tmp_path: Path) -> float:
    """train-student's own formula (``batch_losses``) on the first ``count`` rows, as its native
    loader path builds the batch (shard header intact)."""
    from softlabels import collate
    from softlabels.hf import HFLogits
    from softlabels.options import TrainConfig
    from softlabels.train import batch_losses, student_logits

    native = collate(pa.concat_tables([pq.read_table(p) for p in sorted((directory / "data").glob("*.parquet"))]).slice(0, count))
    config = TrainConfig(data=[str(directory)], student="unused", out=str(tmp_path / "unused"), temperature=temperature, alpha=alpha)
    with torch.no_grad():
        return float(batch_losses(student_logits(HFLogits(student), native, torch.device("cpu")), native, config, next_token=True)["loss"])


@pytest.mark.parametrize("name", ["train", "train-uint8"])
def test_trainer_loss_on_a_batch_is_kd_loss_plus_next_token_ce(soft_dirs, tmp_path, name):
    directory = soft_dirs[name]
    alpha, temperature = 0.3, 2.0
    dataset = load_soft_label_dataset(directory, cache_dir=tmp_path / "cache")
    collator = SoftLabelCollator.from_directory(directory)
    student = llama(seed=5).eval()
    trainer = SoftLabelTrainer(model=student, args=training_args(tmp_path / "out"), data_collator=collator,
                               temperature=temperature, alpha=alpha, tail="bucket")
    count = 13  # ragged: lengths 1..23, so padding, one-token rows and row ends all occur
    batch = collator([dataset[i] for i in range(count)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)

    want = targets_by_hand(directory, shard_rows(directory, count))
    assert torch.equal(batch["input_ids"], want["tokens"]) and torch.equal(batch["attention_mask"], want["attention"])
    with torch.no_grad():
        logits = student(input_ids=want["tokens"], attention_mask=want["attention"]).logits
        kd = kd_loss(logits, want["ids"], want["logprobs"], temperature, "bucket", mask=want["mask"])
        has = want["next"] != -100
        ce = torch.nn.functional.cross_entropy(logits[has], want["next"][has])
    assert int(has.sum()) > 0 and bool((~want["mask"]).any())  # the batch does pad and does have labels
    assert float(loss) == pytest.approx(float(alpha * kd + (1 - alpha) * ce), rel=1e-5, abs=1e-6)

    assert float(loss) == pytest.approx(train_student_loss(directory, count, student, temperature, alpha, tmp_path), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name, temperature", [("train", 2.0), ("train-sampled", 1.0)])
def test_thirty_trainer_steps_lower_the_held_out_kd(soft_dirs, tmp_path, name, temperature):
    """alpha 1: the corpus's next tokens are uniform noise, so CE would only pull the student away.
    From top-k targets, and from N=12 draws per position (T=1), both evaluated on held-out top-k."""
    train = load_soft_label_dataset(soft_dirs[name], cache_dir=tmp_path / "cache")
    heldout = load_soft_label_dataset(soft_dirs["heldout"], cache_dir=tmp_path / "cache")
    trainer = SoftLabelTrainer(model=llama(seed=7, tied=False), args=training_args(tmp_path / "out", max_steps=30), train_dataset=train,
                               eval_dataset=heldout, data_collator=SoftLabelCollator.from_directory(soft_dirs[name]),
                               temperature=temperature, alpha=1.0)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    logged = [record for record in trainer.state.log_history if "loss" in record and "kd" in record]
    assert len(logged) == 6 and all(math.isfinite(r["loss"]) for r in logged)
    assert all(r["loss"] == pytest.approx(r["kd"], rel=1e-5) for r in logged)  # alpha 1: the loss is the KD term
    assert logged[-1]["kd"] < 0.85 * logged[0]["kd"]
    assert after["eval_kd"] < 0.8 * before["eval_kd"], (before, after)
    assert after["eval_top1_agreement"] > before["eval_top1_agreement"] + 0.1


def test_eval_kd_equals_train_student_evaluate(soft_dirs, tmp_path):
    from softlabels.data import SoftLabelDataset
    from softlabels.hf import HFLogits
    from softlabels.options import TrainConfig
    from softlabels.train import evaluate

    directory = soft_dirs["heldout"]
    student = llama(seed=9)
    trainer = SoftLabelTrainer(model=student, args=training_args(tmp_path / "out", per_device_eval_batch_size=6),
                               data_collator=SoftLabelCollator.from_directory(directory), temperature=1.5, alpha=0.5, tail="renorm")
    ours = trainer.evaluate(load_soft_label_dataset(directory, cache_dir=tmp_path / "cache"))
    config = TrainConfig(data=[str(directory)], student="unused", out=str(tmp_path / "unused"), temperature=1.5, tail="renorm", batch_size=10)
    theirs = evaluate(HFLogits(student), SoftLabelDataset(directory, batch_size=10, shuffle=False), config, torch.device("cpu"), next_token=True,
                      precision=autocast(torch.device("cpu"), config.precision))
    for key in ("eval_kd", "eval_ce", "eval_top1_agreement"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


def test_gradient_accumulation_averages_micro_batch_means(soft_dirs, tmp_path):
    """One SGD step over 8 equal-length rows: 2 micro-batches of 4 move the weights as 1 batch of 8 does
    (the loss is a per-batch mean, so the Trainer must divide it by the accumulation steps)."""
    rows = load_soft_label_dataset(soft_dirs["train"], cache_dir=tmp_path / "cache").filter(lambda row: len(row["inputs"]) == 10)
    assert len(rows) == 8
    updates = {}
    for accumulation, batch_size in ((1, 8), (2, 4)):
        model = llama(seed=4)
        start = {name: p.detach().clone() for name, p in model.named_parameters()}
        args = training_args(tmp_path / f"ga{accumulation}", max_steps=1, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
        SoftLabelTrainer(model=model, args=args, train_dataset=rows, data_collator=SoftLabelCollator.from_directory(soft_dirs["train"]),
                         alpha=0.5).train()
        updates[accumulation] = {name: p.detach() - start[name] for name, p in model.named_parameters()}
    assert any(float(u.abs().max()) > 1e-4 for u in updates[1].values())
    for name, update in updates[1].items():
        torch.testing.assert_close(updates[2][name], update, rtol=1e-4, atol=1e-7)


def test_a_lora_student_trains_through_the_same_path(soft_dirs, tmp_path):
    peft = pytest.importorskip("peft")
    base = llama(seed=3)
    frozen = {name: value.clone() for name, value in base.state_dict().items()}
    student = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    initial = {name: p.detach().clone() for name, p in student.named_parameters() if p.requires_grad}
    assert initial and all("lora_" in name for name in initial)
    trainer = SoftLabelTrainer(model=student, args=training_args(tmp_path / "out", max_steps=6, logging_steps=2),
                               train_dataset=load_soft_label_dataset(soft_dirs["train"], cache_dir=tmp_path / "cache"),
                               data_collator=SoftLabelCollator.from_directory(soft_dirs["train"]), alpha=0.5)
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    changed = [name for name, p in student.named_parameters() if p.requires_grad and not torch.equal(p.detach(), initial[name])]
    assert any("lora_B" in name for name in changed) and any("lora_A" in name for name in changed)
    merged_free = {name.replace("base_model.model.", "").replace(".base_layer", ""): value
                   for name, value in student.state_dict().items() if "lora_" not in name}
    assert all(torch.equal(merged_free[name], value) for name, value in frozen.items())  # base weights untouched


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
)


def test_chat_shards_train_only_at_the_assistant_positions(tmp_path):
    """Chat shards (targets at assistant positions only): the Trainer's loss is kd_loss and next-token CE
    over exactly the positions the native loader marks, and a batch with no target gives 0, not NaN."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from softlabels import collate

    words = ["[UNK]", "system", "user", "assistant", *[f"w{i}" for i in range(40)]]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(2)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    teacher = transformers.LlamaForCausalLM(config)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    rng = np.random.default_rng(4)

    def say(words: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, 40, words))

    conversations = [{"id": f"c{i:02d}", "messages": [{"role": "user", "content": say(int(rng.integers(1, 9)))},
                                                      {"role": "assistant", "content": say(int(rng.integers(1, 12)))}] * (1 + i % 2)}
                     for i in range(17)]
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    out = tmp_path / "soft"
    generate(GenerateConfig(corpus=[str(corpus)], teachers=[f"hf:{tmp_path / 'teacher'}"], out=str(out), id_column="id",
                            chat_column="messages", max_length=64, top_k=6, rows_per_shard=7, progress=False))

    rows = load_soft_label_dataset(out, cache_dir=tmp_path / "cache")
    collator = SoftLabelCollator.from_directory(out)
    batch = collator([rows[i] for i in range(len(rows))])
    native = collate(pa.concat_tables([pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))]))
    assert torch.equal(batch["target_mask"], native["mask"]) and torch.equal(batch["input_ids"], native["inputs"])
    assert 0 < int(native["mask"].sum()) < int(native["lengths"].sum())  # the prompts carry no targets

    torch.manual_seed(6)
    student = transformers.LlamaForCausalLM(config)
    trainer = SoftLabelTrainer(model=student, args=training_args(tmp_path / "out"), data_collator=collator, temperature=2.0, alpha=0.4)
    with torch.no_grad():
        loss = trainer.compute_loss(student, batch)
        logits = student(input_ids=native["inputs"], attention_mask=batch["attention_mask"]).logits
    mask = native["mask"]
    kd = kd_loss(logits, native["topk_ids"], native["topk_logprobs"], 2.0, "bucket", mask=mask)
    following = torch.roll(native["inputs"], -1, dims=1)  # a target position always has a next (assistant) token
    ce = torch.nn.functional.cross_entropy(logits[mask], following[mask])
    assert float(loss) == pytest.approx(float(0.4 * kd + 0.6 * ce), rel=1e-5, abs=1e-6)

    lonely = collator([rows[0]])  # generate drops a conversation without assistant tokens; a window may still have none
    lonely["target_mask"][:] = False
    student.zero_grad()
    zero = trainer.compute_loss(student, lonely)
    zero.backward()
    assert float(zero.detach()) == 0.0 and all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_misuse_is_one_clear_line(soft_dirs, tmp_path):
    directory = soft_dirs["train"]
    collator = SoftLabelCollator.from_directory(directory)
    with pytest.raises(UserError, match="remove_unused_columns=False"):
        SoftLabelTrainer(model=llama(seed=1), args=training_args(tmp_path / "a", remove_unused_columns=True), data_collator=collator)
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB - 44, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    trainer = SoftLabelTrainer(model=small, args=training_args(tmp_path / "b"), data_collator=collator)
    rows = load_soft_label_dataset(directory, verify_sha256=False, cache_dir=tmp_path / "cache")
    batch = collator([rows[i] for i in range(4)])
    batch["input_ids"] = batch["input_ids"] % (VOCAB - 44)
    with pytest.raises(UserError, match="256 output classes.*300"):
        trainer.compute_loss(trainer.model, batch)
    with pytest.raises(UserError, match="alpha"):
        SoftLabelTrainer(model=llama(seed=1), args=training_args(tmp_path / "c"), data_collator=collator, alpha=1.5)
    (tmp_path / "unsealed").mkdir()
    with pytest.raises(UserError):
        load_soft_label_dataset(tmp_path / "unsealed")


def sampled_kd_by_hand(table: pa.Table, logits: torch.Tensor, temperature: float, proposal: float) -> float:
    """T^2 x mean over positions of sum_i (c_i / N) (log q_i - log s_T(i)), q = p^(1/t) / Z_t, with T = t:
    the RS-KD estimate written out per position from the pyarrow rows, in float64."""
    log_s = torch.log_softmax(logits.double() / temperature, dim=-1).numpy()
    total, positions = 0.0, 0
    for i, row in enumerate(table.to_pylist()):
        normalizers = row.get("sample_log_normalizer") or [0.0] * len(row["sample_ids"])
        for t, (ids, counts, logprobs) in enumerate(zip(row["sample_ids"], row["sample_counts"], row["sample_logprobs"])):
            n = sum(counts)
            total += sum(c / n * (lp / proposal - normalizers[t] - log_s[i, t, v]) for v, c, lp in zip(ids, counts, logprobs))
            positions += 1
    return temperature**2 * total / positions


@pytest.mark.parametrize("name, temperature", [("train-sampled", 1.0), ("train-sampled-t2", 2.0)])
def test_trainer_loss_on_sampled_shards_is_the_rs_kd_estimate(soft_dirs, tmp_path, name, temperature):
    directory, alpha, count = soft_dirs[name], 0.3, 13
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["targets"] == "sample" and ("sample_log_normalizer" in pq.read_schema(
        next((directory / "data").glob("*.parquet"))).names) == (temperature != 1.0)
    dataset = load_soft_label_dataset(directory, cache_dir=tmp_path / "cache")
    collator = SoftLabelCollator.from_directory(directory)
    batch = collator([dataset[i] for i in range(count)])
    assert "topk_ids" not in batch and batch["sample_ids"].shape[:2] == batch["target_mask"].shape
    student = llama(seed=5).eval()
    trainer = SoftLabelTrainer(model=student, args=training_args(tmp_path / "out"), data_collator=collator,
                               temperature=temperature, alpha=alpha)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        table = shard_rows(directory, count)
        want = targets_by_hand(soft_dirs["train"], shard_rows(soft_dirs["train"], count))  # same corpus rows: tokens and next tokens
        logits = student(input_ids=want["tokens"], attention_mask=want["attention"]).logits
        kd = sampled_kd_by_hand(table, logits, temperature, temperature)
        has = want["next"] != -100
        ce = float(torch.nn.functional.cross_entropy(logits[has], want["next"][has]))
    assert float(loss) == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5, abs=1e-6)
    assert float(loss) == pytest.approx(train_student_loss(directory, count, student, temperature, alpha, tmp_path), rel=1e-5, abs=1e-6)
    with pytest.warns(UserWarning, match="neither 1 nor the proposal temperature"):  # as train-student warns
        SoftLabelTrainer(model=student, args=training_args(tmp_path / "warn"), data_collator=collator, temperature=1.5)
