#!/usr/bin/env bash
# The test command: installs and builds (scripts/setup.sh), then runs the C++ tests (ctest) and the
# Python tests (pytest). GPU tests skip, and say so, where there is no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ctest --test-dir build/cpp --output-on-failure
python3 -m pytest -q -rs tests/python
