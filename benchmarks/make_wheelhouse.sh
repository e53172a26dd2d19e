#!/usr/bin/env bash
# Builds benchmarks/out/wheelhouse: the pure-Python wheels negalign needs beyond what the CUDA check machine has
# (torch, transformers, peft, sentence-transformers, pyarrow; no network there). Run it here, where pip reaches
# PyPI; then carry benchmarks/out/wheelhouse with the device call (<= 64 MiB of carried paths in all) and run
# `make gpu-check` there, which installs them offline into .gpu-deps/.
#   usage: bash benchmarks/make_wheelhouse.sh   (PY=python3 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=benchmarks/out/wheelhouse
mkdir -p "$OUT"
# --no-deps + the explicit list: typer and rich with their pure-Python dependencies (pyyaml, numpy, pyarrow come
# with transformers / the machine). py3-none-any wheels only, so the machine's Python version and platform do not matter.
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --platform any -d "$OUT" \
  typer click rich markdown-it-py mdurl pygments shellingham typing-extensions
size=$(du -sm "$OUT" | cut -f1)
echo "wheelhouse: $(ls "$OUT" | wc -l) wheels, ${size} MiB in $OUT"
[ "$size" -le 64 ] || { echo "wheelhouse over 64 MiB" >&2; exit 1; }
