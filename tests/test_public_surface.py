"""The public surface: ``softlabels/__init__.py`` exports what the README teaches, under one import path.

The README's command block runs as written (in a scratch copy of its paths), and its result is checked
against the CLI's own run of the same job.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pyarrow.parquet as pq

import softlabels
from conftest import REPO, run_cli, shard_paths

README = (REPO / "README.md").read_text()


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def readme_imports() -> list[tuple[str, str]]:
    """(module, name) of every ``from softlabels... import`` in the README's Python blocks."""
    found = []
    for block in readme_python_blocks():
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "softlabels":
                found += [(node.module, alias.name) for alias in node.names]
    return found


def test_every_public_name_resolves_and_dir_lists_them():
    assert sorted(dir(softlabels)) == sorted(softlabels.__all__)
    for name in softlabels.__all__:
        assert getattr(softlabels, name) is not None, name
    assert callable(softlabels.generate) and callable(softlabels.verify) and callable(softlabels.train_student)
    assert softlabels.SoftLabelTrainer.__module__ == "softlabels.hf_trainer"  # loaded on first use


def test_the_readme_imports_each_public_name_from_softlabels_only():
    imports = readme_imports()
    taught = {name for _, name in imports}
    assert {"generate", "GenerateConfig", "verify", "train_student", "TrainConfig", "SoftLabelDataset", "SoftLabelLoader",
            "collate", "kd_loss", "SoftLabelTrainer", "SoftLabelCollator", "load_soft_label_dataset"} <= taught
    for module, name in imports:
        assert module == "softlabels", f"README imports {name} from {module}, not from softlabels"
        assert name in softlabels.__all__, name


def test_a_fresh_import_of_softlabels_does_not_import_transformers():
    code = "import sys, softlabels; print('transformers' in sys.modules, sorted(dir(softlabels)) == sorted(softlabels.__all__))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert done.stdout.split() == ["False", "True"]


def test_the_readme_api_block_runs_and_equals_the_cli(tmp_path, monkeypatch):
    block = next(b for b in readme_python_blocks() if "from softlabels import GenerateConfig" in b)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data", target_is_directory=True)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102  the README's own code, as written
    assert namespace["summary"].rows == 1247 and namespace["trained"].steps == 20
    assert (tmp_path / "out" / "api_student" / "student.safetensors").is_file()
    cli = tmp_path / "cli_digits"
    teachers = [a for i in range(3) for a in ("--teacher", f"softlabels.models:digits_cnn@{REPO}/data/teachers/digits_cnn_{i}.safetensors")]
    assert run_cli("generate", REPO / "data" / "digits" / "unlabeled.parquet", "--id-column", "id", *teachers, "--out", cli,
                   "--no-progress").code == 0
    ours, theirs = shard_paths(tmp_path / "out" / "api_digits"), shard_paths(cli)
    assert len(ours) == len(theirs) == 1
    assert pq.read_table(ours[0]).equals(pq.read_table(theirs[0]))
