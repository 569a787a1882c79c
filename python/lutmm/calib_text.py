"""In-domain calibration text for mini-llama: GCIDE dictionary entries from the model's training text that
come before the held-out slice (docs/quality.md, *Calibration domain*).

mini-llama was trained on the first 14 MB of the GCIDE dictionary (Debian package dict-gcide, whitespace runs
collapsed to one space) after the Python docs and the fortune files; `shared/data/heldout.txt` is the last 1%
of that corpus, dictionary entries from "Gor..." to "Grot...". This module rebuilds that dictionary text from
the Debian package and keeps only whole entries that end before the held-out slice begins, then checks that
the result shares no `OVERLAP_CHARS`-character substring with the held-out text.

    bash scripts/get_calib.sh                      # writes build/calib/gcide-train.txt (+ .json manifest)
    python3 -m lutmm.calib_text --out FILE --heldout shared/data/heldout.txt

Needs `apt-get download` (Debian / Ubuntu apt, no root) and `dpkg-deb`; writes nothing when either fails.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

PACKAGE = "dict-gcide"
DICT_MEMBER = "usr/share/dictd/gcide.dict.dz"
DEFAULT_OUT = Path("build") / "calib" / "gcide-train.txt"
DEFAULT_CHARS = 3_000_000  # ~0.9M mini-llama tokens: far more than any calibration run samples
OVERLAP_CHARS = 200
_ENTRY_START = re.compile(r"\n\n(?=[^\s\\][^\n\\]*\\)")  # a blank line, then "Headword \Head*word\..."


def normalize(text: str) -> str:
    """The training text's whitespace: every run of spaces / tabs becomes one space (newlines are kept)."""
    return re.sub(r"[ \t]+", " ", text)


def fetch_dictionary(workdir: Path) -> tuple[str, str]:
    """(normalized dictionary text, package file name) of the dict-gcide Debian package, via `apt-get download`
    into `workdir` (no root needed) and `dpkg-deb -x`."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: the GCIDE calibration text needs a Debian/Ubuntu apt system")
    got = subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, capture_output=True, text=True)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if got.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download {PACKAGE} failed (run `apt-get update` first?): "
                           f"{got.stderr.strip()[-500:]}")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(workdir / "x")], check=True)
    raw = gzip.decompress((workdir / "x" / DICT_MEMBER).read_bytes())  # dictzip is gzip-compatible
    return normalize(raw.decode("utf-8", errors="replace")), debs[0].name


def first_entry_end(heldout: str) -> str:
    """The held-out text's first complete entry line ("Gord \\Gord\\, n. ..."), used to find where it begins
    in the dictionary."""
    m = _ENTRY_START.search("\n\n" + heldout)
    if m is None:
        raise ValueError("held-out text: no dictionary entry (a line 'Word \\Word\\, ...' after a blank line) found")
    return heldout[m.start():].split("\n", 1)[0]


def training_slice(dictionary: str, heldout: str, n_chars: int = DEFAULT_CHARS) -> tuple[str, int, int]:
    """(text, start, end): the last whole entries of `dictionary` that end before the held-out slice begins,
    about `n_chars` characters, starting at an entry. The cut is made before the entry in which the held-out
    text starts (it begins mid-entry), so no entry is split between calibration and evaluation text."""
    pos = dictionary.find(heldout[:2000])
    if pos < 0:  # another package version: cut before the held-out slice's first whole entry instead
        line = first_entry_end(heldout)
        pos = dictionary.find("\n" + line + "\n")
        if pos < 0:
            raise ValueError(f"dictionary: held-out entry {line[:40]!r} not found; cannot place the cut safely")
    end = dictionary.rfind("\n\n", 0, pos) + 2  # start of the entry the held-out text begins in
    if end < 2:
        raise ValueError("dictionary: no entry boundary before the held-out text")
    m = _ENTRY_START.search(dictionary, max(0, end - n_chars))
    start = m.start() + 2 if m is not None and m.start() + 2 < end else max(0, end - n_chars)
    return dictionary[start:end], start, end


def shared_substring(a: str, b: str, n: int = OVERLAP_CHARS) -> Optional[int]:
    """An offset into `a` of a substring of `n` characters that also occurs in `b`, or None. Any such common
    substring contains one of b's n//2-character chunks at offsets k*(n//2), so only those are indexed."""
    half = max(1, n // 2)
    chunks: dict = {}
    for k in range(0, len(b) - half + 1, half):
        chunks.setdefault(b[k:k + half], []).append(k)
    for i in range(0, len(a) - half + 1):
        for k in chunks.get(a[i:i + half], ()):  # extend the common chunk both ways
            lo, hi = 0, half
            while i - lo > 0 and k - lo > 0 and a[i - lo - 1] == b[k - lo - 1]:
                lo += 1
            while i + hi < len(a) and k + hi < len(b) and a[i + hi] == b[k + hi]:
                hi += 1
            if lo + hi >= n:
                return i - lo
    return None


def build(out: Path, heldout_path: Path, n_chars: int = DEFAULT_CHARS) -> dict:
    """Downloads the dictionary, writes the calibration text to `out` and a manifest to `out`.json; returns it.
    Raises (and writes nothing) when the text cannot be placed before, or overlaps, the held-out text."""
    heldout = Path(heldout_path).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="lutmm-gcide-") as tmp:
        dictionary, deb = fetch_dictionary(Path(tmp))
    text, start, end = training_slice(dictionary, heldout, n_chars)
    hit = shared_substring(text, heldout)
    if hit is not None:
        raise ValueError(f"calibration text shares a {OVERLAP_CHARS}-character substring with {heldout_path} "
                         f"at offset {hit}: {text[hit:hit + 60]!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    manifest = {"source": deb, "dictionary_chars": [start, end], "chars": len(text),
                "first_line": text.split("\n", 1)[0], "last_line": text.rstrip("\n").rsplit("\n", 1)[-1],
                "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "heldout": str(heldout_path),
                "overlap_check": f"no common substring of {OVERLAP_CHARS} characters"}
    Path(str(out) + ".json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m lutmm.calib_text", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"output text file (default {DEFAULT_OUT})")
    ap.add_argument("--heldout", default=None,
                    help="evaluation text to keep out (default $LUTMM_SHARED/data/heldout.txt, else ../shared/...)")
    ap.add_argument("--chars", type=int, default=DEFAULT_CHARS, help=f"characters to keep (default {DEFAULT_CHARS})")
    args = ap.parse_args(argv)
    heldout = args.heldout or Path(os.environ.get("LUTMM_SHARED") or Path.cwd().parent / "shared") / "data" / \
        "heldout.txt"
    if not Path(heldout).is_file():
        print(f"error: held-out text {heldout} not found; pass --heldout FILE", file=sys.stderr)
        return 2
    try:
        m = build(Path(args.out), Path(heldout), args.chars)
    except (RuntimeError, ValueError, OSError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {m['chars']} characters of {m['source']}, {m['first_line'][:30]!r} .. "
          f"{m['last_line'][:30]!r}; {m['overlap_check']} with {heldout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
