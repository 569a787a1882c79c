#!/usr/bin/env bash
# Installs what lutmm needs from scratch (Debian packages, pinned PyPI packages) and builds the C++
# library with its tests (build/cpp) and the Python package. Safe to re-run: finished steps are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v ninja >/dev/null || need_apt+=(ninja-build)
command -v g++ >/dev/null || need_apt+=(g++)
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
if ((${#need_apt[@]})); then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
python3 -m pip install -q --disable-pip-version-check -r requirements-dev.txt
cmake -S . -B build/cpp -G Ninja -DLUTMM_BUILD_TESTS=ON > build-cmake.log 2>&1 || { cat build-cmake.log; exit 1; }
rm -f build-cmake.log
cmake --build build/cpp
python3 -m pip install -q --disable-pip-version-check --no-build-isolation .
# In-domain calibration text for the quality gate and `lutmm quantize` on mini-llama (docs/quality.md);
# optional: without it (no network or apt lists) the gate skips and quantize falls back to WikiText-2.
bash scripts/get_calib.sh || echo "setup: no in-domain calibration text; lutmm quantize falls back to WikiText-2"
