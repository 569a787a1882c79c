"""bench/bench_kernel.py's timing rules on the CPU, with fake graphs (the real ones need CUDA):
time_settled replays each graph alone for settle_s before timing it, times it `reps` times, and returns
one median per graph in order; n_copies rotates enough weight copies to span 3x the L2."""
import importlib.util
import os

import pytest

from conftest import REPO


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernel", os.path.join(REPO, "bench", "bench_kernel.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _FakeGraph:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def replay(self):
        self.log.append(("replay", self.name))


class _FakeTimer:
    """GraphTimer's interface: graph.replay() untimed, once() -> us per call."""

    def __init__(self, log, name, samples):
        self.graph = _FakeGraph(log, name)
        self.log, self.name, self.samples = log, name, list(samples)

    def once(self):
        self.log.append(("once", self.name))
        return self.samples.pop(0)


def test_time_settled_settles_each_graph_alone_then_takes_the_median(monkeypatch):
    bk = _load()
    monkeypatch.setattr(bk.torch.cuda, "synchronize", lambda *a, **k: None)
    clock = [0.0]

    def fake_clock():  # 1 ms per call: the settle loop ends after settle_s of replays
        clock[0] += 1e-3
        return clock[0]

    monkeypatch.setattr(bk.time, "perf_counter", fake_clock)
    log = []
    a = _FakeTimer(log, "a", [5.0, 1.0, 3.0, 100.0, 2.0])
    b = _FakeTimer(log, "b", [7.0, 9.0, 8.0, 6.0, 10.0])
    meds = bk.time_settled([a, b], reps=5, settle_s=0.05)
    assert meds == [3.0, 8.0]  # medians, in the timers' order
    names = [n for _, n in log]
    assert names == sorted(names)  # a entirely before b: no interleaving
    for t in ("a", "b"):
        events = [e for e, n in log if n == t]
        first_timed = events.index("once")
        assert first_timed >= 8 and set(events[:first_timed]) == {"replay"}  # settled before timing
        assert events[first_timed:] == ["once"] * 5  # then exactly `reps` timed replays


@pytest.mark.parametrize("nbytes,want", [(1, 16), (10 << 20, 15), (35 << 20, 5), (242 << 20, 1), (0, 16)])
def test_n_copies_spans_three_l2s(nbytes, want):
    bk = _load()
    assert bk.n_copies(nbytes) == want


def test_calibrate_takes_the_floors_and_the_l2_from_the_running_card(monkeypatch):
    """On an H200 (60 MiB L2, ~4.3 TB/s copy) the H100's constants would overstate % of floor by ~1.4x
    and rotate too few weight copies; calibrate() replaces all three with the card's own."""
    bk = _load()

    class Props:
        name, multi_processor_count, L2_cache_size = "Fake H200", 132, 60 << 20

    monkeypatch.setattr(bk.torch.cuda, "get_device_properties", lambda dev: Props())
    monkeypatch.setattr(bk.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bk, "_copy_and_matmul_us", lambda dev: (500.0, 1400.0))
    assert bk.n_copies(35 << 20) == 5  # H100 defaults: 150 MiB / 35 MiB
    header = bk.calibrate("cuda")
    assert bk.L2_BYTES == 60 << 20
    assert bk.PEAK_BYTES_S == pytest.approx(2 * (1 << 30) / 500e-6)  # bytes read + written
    assert bk.PEAK_FLOPS == pytest.approx(2 * 8192 ** 3 / 1400e-6)
    assert bk.n_copies(35 << 20) == 6  # 180 MiB / 35 MiB
    assert "Fake H200" in header and "L2 60 MiB" in header and "copy 4.29 TB/s" in header and "785 TFLOP/s" in header
