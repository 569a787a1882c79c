#!/usr/bin/env python3
"""The short table at the end of a kernel A/B call (`bash scripts/gpu.sh kab`).

gpu.sh appends every round of every build to $OUT/ab.txt: a "== kab HH:MM:SS" line per call, then
sections headed "== A: default (round r)", "== B: LUTMM_EXPERIMENT=E  (round r, ...)" or
"== NAME: COMMIT ARGS" (a carried base tree), each followed by lutmm_bench lines
("N x K  M  b  g  path  us  TB/s  TFLOP/s"). This reads the last call's part and prints one row per
case: each build's times over its rounds, us, and each B build's mean time over A's. A case a build
did not time (it stopped, or AB_B_PATHS left it out) shows "-".

With AB_CLOCKS=1, each case line ends in its wall-clock window ("@HH:MM:SS.mmm-HH:MM:SS.mmm") and
clocks.csv beside ab.txt holds nvidia-smi's samples (timestamp, SM clock, memory clock, power,
temperature, clock event reasons); a second table then gives, per case and build over its rounds, the
median SM clock, the mean power and the share of samples with the power cap (reason bit 0x4) set.

Usage: python3 scripts/ab_summary.py [ab.txt]   (default: $OUT/ab.txt, else /tmp/lutmm-out/ab.txt)
"""
import os
import re
import sys


def header_build(line):
    """The build a section header names: "A", "x<E>" for an experiment, a base tree's name; None else."""
    if line.startswith("== A: default"):
        return "A"
    m = re.match(r"== B: LUTMM_EXPERIMENT=(\d+)", line)
    if m:
        return None if "did not build" in line else "x" + m.group(1)
    m = re.match(r"== ([\w.-]+): ", line)
    return m.group(1) if m else None


def parse(text, windows=None):
    """{build: {case: [us, ...]}} and the builds and cases in first-seen order, from the last call; with
    a dict for windows, also {build: {case: [(start s, end s), ...]}} from the lines' "@" windows."""
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("== kab")]
    lines = lines[starts[-1] + 1:] if starts else lines
    times, builds, cases = {}, [], []
    build = None
    for ln in lines:
        if ln.startswith("== "):
            build = header_build(ln)
            if build is None:
                continue
            if build not in times:
                times[build] = {}
                builds.append(build)
            continue
        f = ln.split()
        if build is None or len(f) < 6 or "x" not in f[0]:
            continue
        try:
            us = float(f[5])
        except ValueError:
            continue
        case = " ".join(f[:5])
        times[build].setdefault(case, []).append(us)
        if windows is not None and f[-1].startswith("@"):
            windows.setdefault(build, {}).setdefault(case, []).append(tuple(_secs(t) for t in f[-1][1:].split("-")))
        if case not in cases:
            cases.append(case)
    return times, builds, cases


def _secs(hms):
    """Seconds into the day of "HH:MM:SS[.fff]"."""
    h, m, sec = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


# Clock event reasons (NVML): bit 0x4 is the software power cap.
POWER_CAP = 0x4


def parse_clocks(text):
    """nvidia-smi's samples as (seconds into the day, SM MHz, W, reasons); lines it could not read skipped."""
    out = []
    for ln in text.splitlines():
        f = [x.strip() for x in ln.split(",")]
        if len(f) < 6:
            continue
        try:
            t = _secs(f[0].split()[-1])
            mhz = float(f[1].split()[0])
            watts = float(f[3].split()[0])
            reasons = int(f[5], 16)
        except (ValueError, IndexError):
            continue
        out.append((t, mhz, watts, reasons))
    return out


def clocks_table(windows, samples, builds, cases):
    """Per case and build: median SM MHz, mean W and power-capped share of the samples in its windows."""
    head = ["N x K  M  b  g  path"] + [f"{b}  MHz / W / capped" for b in builds]
    rows = [head]
    for c in cases:
        row = [c]
        for b in builds:
            inside = [s for lo, hi in windows.get(b, {}).get(c, []) for s in samples if lo <= s[0] <= hi]
            if not inside:
                row.append("-")
                continue
            mhz = sorted(s[1] for s in inside)[len(inside) // 2]
            watts = sum(s[2] for s in inside) / len(inside)
            capped = sum(1 for s in inside if s[3] & POWER_CAP) / len(inside)
            row.append(f"{mhz:.0f} / {watts:.0f} / {100 * capped:.0f}%")
        rows.append(row)
    return _columns(rows)


def _columns(rows):
    """The rows as text, each column padded to its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def table(times, builds, cases):
    """The rows as text: case, then per build its rounds (us) and, for B builds, mean(B) / mean(A)."""
    mean = lambda v: sum(v) / len(v)
    head = ["N x K  M  b  g  path"] + [b if b == "A" else f"{b}  (/A)" for b in builds]
    rows = [head]
    for c in cases:
        a = times.get("A", {}).get(c)
        row = [c]
        for b in builds:
            v = times[b].get(c)
            if not v:
                row.append("-")
                continue
            cell = " / ".join(f"{x:.1f}" for x in v)
            if b != "A" and a:
                cell += f"  ({mean(v) / mean(a):.3f})"
            row.append(cell)
        rows.append(row)
    return _columns(rows)


def main(argv):
    path = argv[1] if len(argv) > 1 else os.path.join(os.environ.get("OUT", "/tmp/lutmm-out"), "ab.txt")
    windows = {}
    with open(path) as f:
        times, builds, cases = parse(f.read(), windows)
    if not cases:
        print(f"ab_summary: no timed cases in {path}")
        return 1
    print(table(times, builds, cases))
    clocks = os.path.join(os.path.dirname(path), "clocks.csv")
    if windows and os.path.exists(clocks):
        with open(clocks) as f:
            samples = parse_clocks(f.read())
        print("== clocks while each case ran (clocks.csv): median SM MHz / mean W / power-capped samples")
        print(clocks_table(windows, samples, builds, cases))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
