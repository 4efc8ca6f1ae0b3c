#!/bin/sh
cd "$(dirname "$0")/.." && exec python pipelines/bench_generate.py "$@"
