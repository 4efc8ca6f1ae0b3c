#!/usr/bin/env bash
# Run one benchmark script under two revisions of this repository, alternating, in one session: each
# revision's own copy of the script imports that revision's softlabels (the scripts put their tree
# first on sys.path), so a refactor's before and after are measured on the same machine and load.
#
#   bash pipelines/bench_versions.sh BEFORE AFTER ROUNDS SCRIPT [ARGS...]
#   bash pipelines/bench_versions.sh de6c1db HEAD 2 pipelines/bench_loader.py --rows 2000 --rounds 3
#   bash pipelines/bench_versions.sh de6c1db HEAD 2 pipelines/bench_generate.py --pairs 2
#
# BEFORE and AFTER are any git revisions; each is checked out once into a temporary worktree (removed
# at the end). The rounds go BEFORE, AFTER, BEFORE, AFTER, ...; each run's output is printed under a
# "== REVISION round N ==" line. A script's work folder (--out / --work) is kept per revision, so what
# it builds once (a corpus, a teacher) is reused by its later rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 4 ]; then
  echo "usage: bash pipelines/bench_versions.sh BEFORE AFTER ROUNDS SCRIPT [ARGS...]" >&2
  exit 2
fi
BEFORE=$1 AFTER=$2 ROUNDS=$3 SCRIPT=$4
shift 4
SCRATCH=$(mktemp -d -t softlabels-bench-versions-XXXXXX)
cleanup() {
  for tree in "$SCRATCH"/tree-*; do [ -d "$tree" ] && git worktree remove --force "$tree" >/dev/null 2>&1 || true; done
  rm -rf "$SCRATCH"
}
trap cleanup EXIT
for REV in "$BEFORE" "$AFTER"; do
  NAME=$(git rev-parse --short "$REV")
  git worktree add --detach --quiet "$SCRATCH/tree-$NAME" "$REV"
  [ -f "$SCRATCH/tree-$NAME/$SCRIPT" ] || { echo "$SCRIPT: not in revision $REV" >&2; exit 2; }
done
case "$SCRIPT" in *bench_loader.py) WORK_FLAG=--work ;; *) WORK_FLAG=--out ;; esac
for ROUND in $(seq 1 "$ROUNDS"); do
  for REV in "$BEFORE" "$AFTER"; do
    NAME=$(git rev-parse --short "$REV")
    echo "== $REV ($NAME) round $ROUND =="
    (cd "$SCRATCH/tree-$NAME" && python "$SCRIPT" "$@" "$WORK_FLAG" "$SCRATCH/work-$NAME")
  done
done
