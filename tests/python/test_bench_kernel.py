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


def test_graph_timer_warms_up_captures_once_and_reports_us_per_call(monkeypatch):
    """GraphTimer runs each callable once outside capture (workspaces grow there), captures each once,
    and once() turns one replay's event time (ms) into microseconds per captured call."""
    bk = _load()
    log = []

    class FakeGraph:
        def replay(self):
            log.append("replay")

    class Ctx:
        def __init__(self, tag):
            self.tag = tag

        def __enter__(self):
            log.append(f"enter {self.tag}")

        def __exit__(self, *a):
            log.append(f"exit {self.tag}")

    class FakeStream:
        def wait_stream(self, other):
            pass

    class FakeEvent:
        clock = [0.0]

        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            FakeEvent.clock[0] += 6.0  # ms: 6 ms from one record to the next
            self.t = FakeEvent.clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return other.t - self.t

    cuda = bk.torch.cuda
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "current_stream", lambda *a: FakeStream())
    monkeypatch.setattr(cuda, "stream", lambda s: Ctx("stream"))
    monkeypatch.setattr(cuda, "graph", lambda g: Ctx("capture"))
    monkeypatch.setattr(cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(cuda, "Event", FakeEvent)
    fns = [lambda i=i: log.append(f"f{i}") for i in range(3)]
    t = bk.GraphTimer(fns)
    assert log[:5] == ["enter stream", "f0", "f1", "f2", "exit stream"]  # warm-up, outside capture
    assert log[5:10] == ["enter capture", "f0", "f1", "f2", "exit capture"]  # each captured once
    assert log[10:] == ["replay"]  # one replay after capture, untimed
    assert t.once() == pytest.approx(6.0 * 1000 / 3)  # 6 ms for 3 calls: 2000 us per call
    assert t.fns == fns  # the callables (and their tensors) live as long as the graph
