#!/usr/bin/env bash
# The GPU check of issue 12 for a CUDA machine: one verdict line, exit 0 on PASS. See pipelines/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python pipelines/gpu_check.py "$@"
