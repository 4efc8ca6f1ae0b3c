"""Hugging Face transformers models as teachers and students (extra ``[hf]``), local files only.

SPEC forms:

* ``hf:DIR`` - a directory written by ``save_pretrained`` (config.json + safetensors), or one that
  holds a single ``.gguf`` file (loaded with ``gguf_file=``, dequantised to fp32); ``hf:FILE.gguf``
  names the file itself. Teachers and students alike start from these weights;
* ``hf:CONFIG`` - a config ``.json`` file, or a directory holding a config.json and no weight files:
  a model built from the config with fresh random weights (a student trained from scratch);
* ``hf:SOURCE@weights.safetensors`` - the model of SOURCE (any form above) built from its config
  and loaded with the given weights: how a trained ``hf:`` student is rebuilt, whether it started
  from a config, a pretrained directory or a GGUF file.

Every model is fp32 on the CPU, whatever dtype its config records.

Models are wrapped so that they follow the calling convention of every other teacher:
``model(x, lengths)`` with token ids x int64 [B, T] becomes ``input_ids=x, attention_mask``; the
wrapper returns the logits tensor, [B, T, V] for a causal LM and [B, C] for a sequence
classifier. V is the logits' real size, which models often pad beyond the tokenizer (SmolLM2:
49,152), so vocabulary checks compare what the models actually emit.

``HF_HUB_OFFLINE=1`` is set before transformers is imported: without it a missing file costs 26 s
of retries against a hub these machines cannot reach.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from safetensors import SafetensorError

from .errors import UserError
from .storage import sha256_named_files
from .weights import load_weights

__all__ = ["HFLogits", "disable_progress_bars", "hf_identity", "import_transformers", "load_hf_model"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
_progress_bars_enabled = True


def _silence_progress_bars(transformers: Any) -> None:
    transformers.utils.logging.disable_progress_bar()  # transformers' and huggingface_hub's bars
    try:  # the GGUF dequantisation bar is a plain tqdm; route it through the switch above
        from transformers import modeling_gguf_pytorch_utils
    except ImportError:  # pragma: no cover - a transformers without GGUF support has no such bar
        return
    modeling_gguf_pytorch_utils.tqdm = transformers.utils.logging.tqdm


def disable_progress_bars() -> None:
    """Silence transformers' progress bars (weight loading, GGUF dequantisation) in this process.

    Cheap when transformers is not installed or not yet imported: the switch then applies when
    ``hf:`` loading first imports it (and ``HF_HUB_DISABLE_PROGRESS_BARS=1`` covers other importers
    and child processes).
    """
    global _progress_bars_enabled
    _progress_bars_enabled = False
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        _silence_progress_bars(sys.modules["transformers"])


def import_transformers() -> Any:
    """transformers, offline and quiet (the [hf] extra); a UserError when it is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError:
        raise UserError("hf: models need the [hf] extra: pip install -e '.[hf]'") from None
    transformers.logging.set_verbosity_error()
    if not _progress_bars_enabled:
        _silence_progress_bars(transformers)
    return transformers


class HFLogits(nn.Module):
    """A transformers model called as ``model(x)`` or ``model(x, lengths)``; returns logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            mask = torch.ones_like(x)
        else:
            mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).long()
        return self.model(input_ids=x, attention_mask=mask, use_cache=False).logits


def hf_identity(path: Path) -> str:
    """sha256 over config.json and the weight files (names and bytes), in name order."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    return sha256_named_files(files)


@dataclass(frozen=True)
class _Source:
    """Where an ``hf:`` SPEC's config and weights come from (the part before any ``@weights``).

    Attributes:
        directory: what ``from_pretrained`` opens (or a config .json file).
        gguf_file: the name of the GGUF file inside ``directory``, if the model is one.
        pretrained: the source holds weights (safetensors or GGUF), not only a config.
        identity_path: what ``hf_identity`` hashes for the model's identity.
    """

    directory: Path
    gguf_file: str | None
    pretrained: bool
    identity_path: Path

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``from_pretrained`` / ``AutoConfig.from_pretrained`` for this source."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _source(target: str, spec: str, flag: str) -> _Source:
    """Classify the path of an ``hf:`` SPEC (without ``hf:`` and ``@weights``).

    Raises:
        UserError: a missing path, a file that is neither a config .json nor a .gguf, or a
            directory holding several .gguf files.
    """
    path = Path(target)
    if not path.exists():
        raise UserError(f"{flag} {spec}: {path} does not exist (hf: specs load local directories only)")
    if path.is_file():
        if path.suffix == ".gguf":
            return _Source(path.parent, path.name, True, path)
        if path.suffix != ".json":
            raise UserError(f"{flag} {spec}: {path.name} is neither a config .json nor a .gguf file; give the model's directory")
        return _Source(path, None, False, path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise UserError(f"{flag} {spec}: {path} holds several .gguf files ({', '.join(p.name for p in ggufs)}); keep one")
    if ggufs:
        return _Source(path, ggufs[0].name, True, ggufs[0])
    if any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        return _Source(path, None, True, path)
    return _Source(path, None, False, path / "config.json")


def _auto_class(transformers: Any, config: Any) -> Any:
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def load_hf_model(spec: str, flag: str = "--teacher") -> tuple[nn.Module, str]:
    """Load an ``hf:`` SPEC on the CPU in fp32; returns (wrapped model, sha256 identity).

    A source with weights loads them (``from_pretrained``); a config alone builds fresh random
    weights under torch's current RNG state; ``@weights`` builds from the source's config and
    loads that file strictly.
    """
    transformers = import_transformers()
    target, _, weights = spec[len("hf:"):].partition("@")
    source = _source(target, spec, flag)
    try:
        config = transformers.AutoConfig.from_pretrained(str(source.directory), **source.options())
        auto_class = _auto_class(transformers, config)
        if source.pretrained and not weights:
            model = auto_class.from_pretrained(str(source.directory), dtype=torch.float32, **source.options())
        else:  # fp32 whatever dtype the config records (from_config would follow it)
            model = auto_class.from_config(config, dtype=torch.float32)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError, SafetensorError) as exc:  # a damaged or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{flag} {spec}: cannot load the model ({first})") from None
    wrapped = HFLogits(model)  # fp32 already: GGUF models refuse .float()
    if weights:
        load_weights(wrapped, Path(weights), spec, flag)
        return wrapped, hf_identity(Path(weights))
    return wrapped, hf_identity(source.identity_path)
