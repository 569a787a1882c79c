"""scripts/gpu.sh's control flow, run here with stub tools (nvidia-smi, cmake, ninja and the built
binaries are small shell scripts): `kab` must finish, time A and B in turn, print the summary and, with
AB_CLOCKS=1, sample clocks while the cases run, mark each case's window, summarise the clocks per case
and stop the sampler at exit. Session 35 lost a GPU
call to a sampler started before a bare `wait`, which then waited for it until the call's time ran out.
`timeline` must build the instrumentation build (-DLUTMM_EXPERIMENT=200) and run each case with the
timeline switched on."""
import os
import shutil
import signal
import stat
import subprocess

import pytest

from conftest import REPO

# nvidia-smi: one line, or with -lms a sampler that runs until killed (its pid goes to $STUB_PIDS).
NVIDIA_SMI = """#!/bin/bash
if [[ "$*" == *-lms* ]]; then
  echo $$ >> "$STUB_PIDS"
  while true; do echo "$(date +%Y/%m/%d\\ %T.%3N), 1980 MHz, 3201 MHz, 500.00 W, 40, 0x0"; sleep 0.02; done
fi
echo "Stub H200, 143771 MiB, 570.00, 1980 MHz, 3201 MHz"
"""
CMAKE = """#!/bin/bash
echo "$*" >> "$STUB_CMAKE_LOG"
while [[ $# -gt 0 ]]; do [[ $1 == -B ]] && mkdir -p "$2"; shift; done
"""
# ninja -C DIR ...: "builds" every binary gpu.sh runs. lutmm_bench prints one timing line; a B build
# (its directory ends in -x<E>) is 10% slower, so the summary's ratio is known.
NINJA = """#!/bin/bash
d=$2
for t in lutmm_bench lutmm_tests lutmm_gpu_tests; do
  cat > "$d/$t" <<'EOS'
#!/bin/bash
if [[ $(basename "$0") == lutmm_bench ]]; then
  us=20.0; [[ $0 == *-x* ]] && us=22.0
  sleep 0.2
  [[ -n $LUTMM_BENCH_TIMELINE ]] && echo "# header"
  printf "%11s %7s %2s %4s %6s %9s %7s %8s\\n" "${1}x${2}" "$3" "$4" 128 "$5" "$us" 2.00 9.0
  [[ -n $LUTMM_BENCH_TIMELINE ]] && echo "  timeline from $0 raw $LUTMM_BENCH_TIMELINE_RAW"
else
  echo "[  PASSED  ] 3 tests."
fi
EOS
  chmod +x "$d/$t"
done
"""


def _run_kab(tmp_path, extra_env, mode="kab"):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for f in ("gpu.sh", "ab_summary.py"):
        shutil.copy(os.path.join(REPO, "scripts", f), repo / "scripts" / f)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("nvidia-smi", NVIDIA_SMI), ("cmake", CMAKE), ("ninja", NINJA)):
        p = stubs / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    pids = tmp_path / "pids"
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", OUT=str(out), STUB_PIDS=str(pids),
               STUB_CMAKE_LOG=str(tmp_path / "cmake.log"),
               EXPERIMENTS="3", AB_SKIP_TESTS="3", AB_ROUNDS="2",
               AB_CASES="57344 8192 1 4 lut;28672 4096 1 4 lut", **extra_env)
    # Its own session, so that a hang (the failure this test exists for) is ended with every stub in it.
    proc = subprocess.Popen(["bash", "scripts/gpu.sh", mode], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError(f"gpu.sh {mode} did not finish in 60 s:\n{log[-2000:]}")
    return proc.returncode, log, out, pids


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its /proc state says it has ended.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kab_times_a_and_b_in_turn_and_summarises(tmp_path):
    rc, log, out, pids = _run_kab(tmp_path, {})
    assert rc == 0, log
    ab = (out / "ab.txt").read_text()
    assert ab.count("== A: default (round") == 2 and ab.count("== B: LUTMM_EXPERIMENT=3") == 2
    assert " at " not in ab and "@" not in ab  # round start times and case windows only with AB_CLOCKS
    summary = (out / "ab_summary.txt").read_text()
    assert "57344x8192 1 4 128 lut" in summary and "(1.100)" in summary and "== clocks" not in summary
    assert not (out / "clocks.csv").exists() and not pids.exists()


def test_kab_with_clocks_samples_while_timing_and_stops_the_sampler(tmp_path):
    rc, log, out, pids = _run_kab(tmp_path, {"AB_CLOCKS": "1"})
    assert rc == 0, log
    ab = (out / "ab.txt").read_text()
    headers = [line for line in ab.splitlines() if line.startswith("== A:") or line.startswith("== B:")]
    assert len(headers) == 4 and all(" at " in h for h in headers), headers
    samples = (out / "clocks.csv").read_text().splitlines()
    assert len(samples) >= 5 and all("MHz" in s for s in samples[:5])
    pid_list = [int(p) for p in pids.read_text().split()]
    assert len(pid_list) == 1
    assert not _alive(pid_list[0]), "the clock sampler outlived gpu.sh"
    summary = (out / "ab_summary.txt").read_text()
    assert "(1.100)" in summary
    # Every timed case carries its window, and the summary's clock table found samples in each.
    timed = [line for line in ab.splitlines() if "lut" in line]
    assert len(timed) == 8 and all("  @" in line for line in timed), timed
    clock_rows = summary.split("== clocks")[1].splitlines()[2:]
    assert len(clock_rows) == 2 and all(row.count("1980 / 500 / 0%") == 2 for row in clock_rows), summary


@pytest.mark.parametrize("experiment", [None, "201", "200 201"])
def test_timeline_runs_each_case_on_the_instrumentation_build(tmp_path, experiment):
    env = {"TIMELINE_CASES": "4096 4096 1 4;57344 8192 16 2"}
    if experiment:
        env["TIMELINE_EXPERIMENT"] = experiment
    builds = (experiment or "200").split()
    rc, log, out, _ = _run_kab(tmp_path, env, mode="timeline")
    assert rc == 0, log
    cmake = sorted((tmp_path / "cmake.log").read_text().splitlines())
    assert len(cmake) == len(builds), cmake
    for e, line in zip(builds, cmake):
        assert f"-DLUTMM_EXPERIMENT={e}" in line and f"build/gpu-x{e}" in line, cmake
    for e in builds:
        lines = (out / f"timeline-x{e}.txt").read_text().splitlines()
        # Each case: its timing line (the header dropped), then the bench's timeline from that build,
        # with the raw rows going to $OUT.
        assert [line.split()[:3] for line in lines[0::2]] == [["4096x4096", "1", "4"], ["57344x8192", "16", "2"]], lines
        assert all(f"gpu-x{e}/lutmm_bench" in line and f"raw {out}/timeline_raw-x{e}.txt" in line
                   for line in lines[1::2]), lines
        assert f"== build {e}" in log, log
