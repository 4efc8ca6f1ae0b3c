"""Hugging Face transformers models as teachers and students (extra ``[hf]``), local files only.

SPEC forms:

* ``hf:DIR`` - a directory written by ``save_pretrained`` (config.json + safetensors), or one that
  holds a single ``.gguf`` file (loaded with ``gguf_file=``, dequantised to fp32);
* ``hf:DIR@weights.safetensors`` / ``hf:config.json@weights.safetensors`` - a model built from its
  config and loaded with the given weights (how a trained ``hf:`` student is rebuilt);
* as a student, ``hf:CONFIG`` (a config.json or a directory holding one) builds an untrained model.

Models are wrapped so that they follow the calling convention of every other teacher:
``model(x, lengths)`` with token ids x int64 [B, T] becomes ``input_ids=x, attention_mask``; the
wrapper returns the logits tensor, [B, T, V] for a causal LM and [B, C] for a sequence
classifier. V is the logits' real size, which models often pad beyond the tokenizer (SmolLM2:
49,152), so vocabulary checks compare what the models actually emit.

``HF_HUB_OFFLINE=1`` is set before transformers is imported: without it a missing file costs 26 s
of retries against a hub these machines cannot reach.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError

__all__ = ["HFLogits", "load_hf_model", "hf_identity"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError:
        raise UserError("hf: models need the [hf] extra: pip install -e '.[hf]'") from None
    transformers.logging.set_verbosity_error()
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
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _auto_class(transformers: Any, config: Any) -> Any:
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def load_hf_model(spec: str, flag: str = "--teacher") -> tuple[nn.Module, str]:
    """Load an ``hf:`` SPEC on the CPU in fp32; returns (wrapped model, sha256 identity)."""
    transformers = _transformers()
    target, _, weights = spec[len("hf:"):].partition("@")
    path = Path(target)
    if not path.exists():
        raise UserError(f"{flag} {spec}: {path} does not exist (hf: specs load local directories only)")
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    try:
        if weights:
            config = transformers.AutoConfig.from_pretrained(str(path if path.is_dir() else path.parent))
            wrapped = HFLogits(_auto_class(transformers, config).from_config(config))
            from .teachers import load_weights

            load_weights(wrapped, Path(weights), spec, flag)
            return wrapped, hf_identity(Path(weights))
        if ggufs:
            if len(ggufs) > 1:
                raise UserError(f"{flag} {spec}: {path} holds several .gguf files ({', '.join(p.name for p in ggufs)}); keep one")
            config = transformers.AutoConfig.from_pretrained(str(path), gguf_file=ggufs[0].name)
            model = _auto_class(transformers, config).from_pretrained(str(path), gguf_file=ggufs[0].name, dtype=torch.float32)
            identity = hf_identity(ggufs[0])
        elif path.is_file() or not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            config_dir = path.parent if path.is_file() else path
            config = transformers.AutoConfig.from_pretrained(str(config_dir))
            model = _auto_class(transformers, config).from_config(config)  # a student to train from scratch
            identity = hf_identity(config_dir / "config.json")
        else:
            config = transformers.AutoConfig.from_pretrained(str(path))
            model = _auto_class(transformers, config).from_pretrained(str(path), dtype=torch.float32)
            identity = hf_identity(path)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{flag} {spec}: cannot load the model ({first})") from None
    return HFLogits(model), identity  # fp32 already: GGUF models refuse .float()
