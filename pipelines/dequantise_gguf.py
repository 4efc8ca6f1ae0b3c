"""Dequantise a GGUF model once into a safetensors folder, so each later load takes a second, not twenty.

transformers dequantises a ``.gguf`` file to fp32 on every ``from_pretrained`` (about 17-24 s of CPU for
SmolLM2-135M's Q4_1 file). A pipeline that loads its teacher in every stage (generate per target kind,
online KD, the report) pays that each time; this writes the dequantised weights, config and tokenizer
once, and ``hf:OUT`` then loads the very same fp32 tensors.

    python pipelines/dequantise_gguf.py SRC OUT      # SRC: a folder holding one .gguf, or the .gguf file

OUT is written beside itself (``OUT.partial``) and renamed into place when complete; an existing OUT with
a ``config.json`` is left as it is, so a rerun skips the work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gguf_file(source: Path) -> Path:
    """The one .gguf file that SOURCE is or holds."""
    if source.suffix == ".gguf" and source.is_file():
        return source
    found = sorted(source.glob("*.gguf")) if source.is_dir() else []
    if len(found) != 1:
        raise SystemExit(f"{source}: expected one .gguf file, found {len(found)}")
    return found[0]


def dequantise(source: Path, out: Path) -> bool:
    """Write SOURCE's model and tokenizer, dequantised to fp32, as a safetensors folder OUT.

    Returns False (and writes nothing) when OUT already holds a config.json.
    """
    if (out / "config.json").is_file():
        return False
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = gguf_file(source)
    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    model.hf_quantizer = None  # the weights are plain fp32 now; transformers refuses to save a "quantized" model
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a folder holding one .gguf file, or the file")
    parser.add_argument("out", type=Path, help="the safetensors folder to write")
    args = parser.parse_args()
    if dequantise(args.source, args.out):
        print(f"{args.out}: dequantised from {gguf_file(args.source).name}", file=sys.stderr)


if __name__ == "__main__":
    main()
