"""bench/quality_table.py's tables from synthetic rows (no model, no quantization): the per-seed means and the
paired int - LUT comparison that docs/quality.md quotes."""
import argparse
import importlib.util
import os

import pytest

from conftest import REPO


def _load():
    spec = importlib.util.spec_from_file_location("quality_table", os.path.join(REPO, "bench", "quality_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(method, seed, ppl, calib_tokens=32768):
    return {"bits": 3, "group_size": 32, "method": method, "max_tokens": None, "calib_tokens": calib_tokens,
            "text": "/x/heldout.txt", "calib": "gcide", "damp": 0.01, "seed": seed, "ppl": ppl}


def _args(seeds, calib_tokens=32768, text=None):
    return argparse.Namespace(seeds=seeds, max_tokens=None, calib="gcide", damp=0.01, calib_tokens=calib_tokens,
                              text=text)


def test_paired_statistics_by_hand():
    qt = _load()
    # int - LUT in points of 40.0: seed 0 +1.0, seed 1 -0.5, seed 2 +2.0 (seed 3 only in int: not paired)
    ints = {0: 40.8, 1: 40.4, 2: 41.0, 3: 45.0}
    luts = {0: 40.4, 1: 40.6, 2: 40.2}
    mean, se, lower, n = qt.paired(ints, luts, 40.0)
    assert n == 3 and lower == 2
    assert mean == pytest.approx(2.5 / 3)
    d = [1.0, -0.5, 2.0]
    sd = (sum((x - 2.5 / 3) ** 2 for x in d) / 2) ** 0.5
    assert se == pytest.approx(sd / 3 ** 0.5)
    assert qt.paired({0: 40.0}, {0: 39.0}, 40.0) is None  # one common seed: no standard error


def test_markdown_pairs_by_seed_not_by_position():
    qt = _load()
    ref = 40.0
    # gptq-int lacks seed 1; a position-wise pairing would compare int seed 2 with LUT seed 1
    rows = [_row("gptq-int", 0, 40.4), _row("gptq-int", 2, 40.8),
            _row("gptq+kmeans+refit", 0, 40.2), _row("gptq+kmeans+refit", 1, 44.0), _row("gptq+kmeans+refit", 2, 40.4),
            _row("gptq-int", 0, 50.0, calib_tokens=131072),  # another calibration length: never mixed in
            dict(_row("gptq-int", 2, 60.0), text="/x/test.txt")]  # another evaluation text: never mixed in
    md = qt.markdown(rows, ref, _args([0, 1, 2]))
    line = [ln for ln in md.splitlines() if ln.startswith("| 3 | 32 | gptq+kmeans+refit | gptq-int |")]
    assert len(line) == 1
    # seeds 0 and 2: int - LUT = +0.5 and +1.0 points -> mean +0.75, se 0.25, lower on 2 of 2
    assert "+0.75 +- 0.25" in line[0] and "2 of 2" in line[0]
    # the mean table keeps the 32768-token rows only (gptq-int mean of 40.4 and 40.8 = +1.50%)
    assert "+1.50% (+1.00 .. +2.00, n=2)" in md


def test_markdown_without_int_rows_has_no_paired_table():
    qt = _load()
    rows = [_row("gptq+kmeans", 0, 40.2), _row("gptq+kmeans", 1, 40.4)]
    md = qt.markdown(rows, 40.0, _args([0, 1]))
    assert "Paired by seed" not in md and "n=2" in md


def _add_many(path, first, count):
    qt = _load()
    for s in range(first, first + count):
        qt.add_rows(path, [_row("gptq-int", s, 40.0 + s / 100)])


def test_add_rows_from_two_processes_keeps_every_row(tmp_path):
    """Two runs sharing one json (as two quantization jobs on 2 cores do) lose none of each other's rows, and a
    row already there (same key) is not added twice."""
    import multiprocessing as mp
    qt = _load()
    path = tmp_path / "rows.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(path), first, 40)) for first in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = qt.add_rows(path, [_row("gptq-int", 5, 99.0)])  # seed 5's key is there: dropped
    seeds = sorted(r["seed"] for r in rows)
    assert seeds == list(range(40)) + list(range(1000, 1040))
    assert [r["ppl"] for r in rows if r["seed"] == 5] == [40.05]


def test_tables_keep_to_the_cells_and_methods_asked_for():
    qt = _load()
    rows = [_row("gptq-int", 0, 40.4), _row("gptq+kmeans", 0, 40.2), dict(_row("gptq-int", 0, 41.0), bits=4),
            {"bits": 16, "group_size": 0, "method": "bf16", "max_tokens": None, "calib_tokens": 0,
             "text": "/x/heldout.txt", "ppl": 40.0}]
    args = argparse.Namespace(bits=[3], groups=[32], methods=["gptq-int"])
    sel = qt.selected(rows, args)
    assert [(r["bits"], r["method"]) for r in sel] == [(3, "gptq-int"), (16, "bf16")]
