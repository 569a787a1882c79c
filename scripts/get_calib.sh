#!/usr/bin/env bash
# Writes the in-domain calibration text for mini-llama, build/calib/gcide-train.txt (+ .json manifest):
# GCIDE dictionary entries from the model's training text that end before the held-out slice
# (shared/data/heldout.txt), checked to share no 200-character substring with it. Needs apt-get (no root:
# `apt-get download dict-gcide`) and network; on failure it writes nothing and `lutmm quantize` falls back
# to WikiText-2. Safe to re-run: skips the download when the text is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/calib/gcide-train.txt
if [ -s "$out" ] && [ -s "$out.json" ]; then
  echo "get_calib: $out already there"
  exit 0
fi
python3 python/lutmm/calib_text.py --out "$out" "$@"  # runs before the package is installed
