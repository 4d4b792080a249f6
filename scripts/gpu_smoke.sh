#!/usr/bin/env bash
# The whole flow on a CUDA GPU, each row asserting an outcome: see scripts/gpu_smoke.py, which this runs.
#   pip install -e ".[test]" && bash scripts/gpu_smoke.sh [--json results.json]
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_smoke.py" "$@"
