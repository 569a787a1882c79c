"""scripts/ab_summary.py, the table at the end of `gpu.sh kab`: it reads only the last call's part of
ab.txt, names each build by its section header, skips builds that did not build and lines that are
not timings (a stopped lutmm_bench), and divides each B build's mean time by A's, case by case."""
import importlib.util
import os

from conftest import REPO


def _load():
    spec = importlib.util.spec_from_file_location("ab_summary", os.path.join(REPO, "scripts", "ab_summary.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


AB = """== kab 12:00:00
== A: default (round 1)
 8192x8192       1  4  128    lut      99.0    1.00      1.0
== kab 12:38:41
== base: 1234abc -DLUTMM_EXPERIMENT=7
 8192x8192       1  4  128    lut      16.0    2.16      8.4
== A: default (round 1)
 8192x8192       1  4  128    lut      15.0    2.30      8.9
 28672x4096      1  4  128    lut      28.0    2.17      8.4
== B: LUTMM_EXPERIMENT=9  (round 1, tests: skipped (AB_SKIP_TESTS))
 8192x8192       1  4  128    lut      13.5    2.56      9.9
terminate called after throwing an instance of 'lutmm::Error'
  what():  internal: row tiles need M <= 8 and one warp group per CTA
== B: LUTMM_EXPERIMENT=21 did not build
FAILED: some.o
 28672x4096      1  4  128    lut       1.0    9.99      9.9
== A: default (round 2)
 8192x8192       1  4  128    lut      15.4    2.25      8.7
 28672x4096      1  4  128    lut      28.4    2.15      8.4
== B: LUTMM_EXPERIMENT=9  (round 2, tests: skipped (AB_SKIP_TESTS))
 8192x8192       1  4  128    lut      13.7    2.53      9.8
"""


def test_parse_takes_the_last_call_and_each_build_by_its_header():
    m = _load()
    times, builds, cases = m.parse(AB)
    assert builds == ["base", "A", "x9"]  # x21 did not build: its lines are not counted
    assert cases == ["8192x8192 1 4 128 lut", "28672x4096 1 4 128 lut"]
    assert times["A"]["8192x8192 1 4 128 lut"] == [15.0, 15.4]  # not the earlier call's 99.0
    assert times["A"]["28672x4096 1 4 128 lut"] == [28.0, 28.4]
    assert times["x9"] == {"8192x8192 1 4 128 lut": [13.5, 13.7]}
    assert times["base"] == {"8192x8192 1 4 128 lut": [16.0]}


def test_table_gives_rounds_and_mean_ratios_to_a():
    m = _load()
    text = m.table(*m.parse(AB))
    rows = text.splitlines()
    assert rows[0].split()[:5] == ["N", "x", "K", "M", "b"]
    first = rows[1]
    assert first.startswith("8192x8192 1 4 128 lut")
    assert "15.0 / 15.4" in first and "13.5 / 13.7" in first
    assert f"({13.6 / 15.2:.3f})" in first   # x9: mean 13.6 over A's 15.2
    assert f"({16.0 / 15.2:.3f})" in first   # the base tree against A too
    second = rows[2]
    assert second.startswith("28672x4096 1 4 128 lut") and "28.0 / 28.4" in second
    assert second.split()[-1] == "-" and second.count("-") == 2  # neither x9 nor the base timed it


def test_main_reports_a_file_without_timings(tmp_path, capsys):
    m = _load()
    f = tmp_path / "ab.txt"
    f.write_text("== kab 13:00:00\n== A: default (round 1)\n")
    assert m.main(["ab_summary.py", str(f)]) == 1
    assert "no timed cases" in capsys.readouterr().out
    f.write_text(AB)
    assert m.main(["ab_summary.py", str(f)]) == 0
    assert "x9  (/A)" in capsys.readouterr().out


# AB_CLOCKS=1: case lines carry their wall-clock windows, clocks.csv nvidia-smi's samples.
AB_CLOCKED = """== kab 12:00:00
== A: default (round 1) at 12:00:01.000
 57344x8192      1  4  128    lut      81.0    2.98     11.6  @12:00:01.000-12:00:02.000
== B: LUTMM_EXPERIMENT=3  (round 1, tests: skipped (AB_SKIP_TESTS)) at 12:00:03.000
 57344x8192      1  4  128    lut      79.0    3.06     11.9  @12:00:03.000-12:00:04.000
"""
CLOCKS = """2026/11/28 12:00:00.500, 1980 MHz, 3201 MHz, 120.00 W, 33, 0x0000000000000001
2026/11/28 12:00:01.200, 1700 MHz, 3201 MHz, 690.00 W, 50, 0x0000000000000004
2026/11/28 12:00:01.500, 1750 MHz, 3201 MHz, 700.00 W, 51, 0x0000000000000004
2026/11/28 12:00:01.800, 1980 MHz, 3201 MHz, 650.00 W, 51, 0x0000000000000000
garbled line
2026/11/28 12:00:03.500, 1980 MHz, 3201 MHz, 600.00 W, 50, 0x0000000000000000
2026/11/28 12:00:05.000, 1000 MHz, 3201 MHz, 100.00 W, 40, 0x0000000000000001
"""


def test_clocks_table_matches_samples_to_each_case_window(tmp_path, capsys):
    m = _load()
    windows = {}
    times, builds, cases = m.parse(AB_CLOCKED, windows)
    assert times["A"]["57344x8192 1 4 128 lut"] == [81.0]  # the window does not disturb the timing
    assert windows["A"]["57344x8192 1 4 128 lut"] == [(43201.0, 43202.0)]
    samples = m.parse_clocks(CLOCKS)
    assert len(samples) == 6
    row = m.clocks_table(windows, samples, builds, cases).splitlines()[1]
    # A: the three samples inside 12:00:01-02 (not the idle ones around): median 1750 MHz, mean 680 W,
    # two of three power-capped; x3: its one sample.
    assert "1750 / 680 / 67%" in row and "1980 / 600 / 0%" in row
    (tmp_path / "ab.txt").write_text(AB_CLOCKED)
    assert m.main(["ab_summary.py", str(tmp_path / "ab.txt")]) == 0
    assert "== clocks" not in capsys.readouterr().out  # no clocks.csv beside it: no second table
    (tmp_path / "clocks.csv").write_text(CLOCKS)
    assert m.main(["ab_summary.py", str(tmp_path / "ab.txt")]) == 0
    out = capsys.readouterr().out
    assert "== clocks" in out and "1750 / 680 / 67%" in out
