#!/usr/bin/env bash
# The main job: quantize the built-in default model, generate, perplexity and speed against bf16.
# Extra arguments go to `lutmm demo` (see `python3 -m lutmm demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import lutmm._core" 2>/dev/null || bash scripts/setup.sh
python3 -m lutmm demo "$@"
