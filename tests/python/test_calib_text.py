"""In-domain calibration text (lutmm.calib_text): the cut before the held-out slice, the overlap check, and the
real build/calib/gcide-train.txt when scripts/get_calib.sh has written it."""
import json
import os

import pytest

from lutmm import calib_text as C

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dictionary(n_entries=60):
    import random

    r = random.Random(1)
    words = ["".join(r.choice("abcdefghij ") for _ in range(40)) for _ in range(n_entries)]
    entries = [f"Word{i:03d} \\Word{i:03d}\\, n.\n A made-up word: {w}.\n [1913 Webster]\n"
               for i, w in enumerate(words)]
    return "\n".join(entries)


def test_normalize_collapses_spaces_not_newlines():
    assert C.normalize("Gord \\Gord\\, n.\n      An   instrument\t of gaming.\n\n") == \
        "Gord \\Gord\\, n.\n An instrument of gaming.\n\n"


def test_training_slice_ends_before_heldout_at_an_entry():
    d = _dictionary()
    start_ho = d.index("Word040") + 20  # the held-out text starts in the middle of entry 40, as heldout.txt does
    heldout = d[start_ho:]
    text, start, end = C.training_slice(d, heldout, n_chars=1000)
    assert end <= d.index("Word040") and text.endswith("[1913 Webster]\n\n")
    assert C._ENTRY_START.match("\n\n" + text) and 900 <= len(text) <= 1100
    assert C.shared_substring(text, heldout, 40) is None
    # another dictionary version (held-out text not verbatim): cut before its first whole entry
    text2, _, end2 = C.training_slice(d.replace("made-up", "invented"), heldout, n_chars=1000)
    assert end2 <= d.replace("made-up", "invented").index("Word041") and "Word041" not in text2
    with pytest.raises(ValueError, match="not found"):
        C.training_slice(d[:start_ho], "xx\n\nZzz \\Zzz\\, n.\n nothing\n", 1000)


def test_shared_substring_finds_planted_overlap():
    import random

    r = random.Random(0)
    a = "".join(r.choice("abcdefgh") for _ in range(5000))
    b = "".join(r.choice("abcdefgh") for _ in range(5000))
    assert C.shared_substring(a, b) is None
    assert C.shared_substring(a, b[:1000] + a[1234:1434] + b[1000:]) == 1234  # 200 shared characters
    assert C.shared_substring(a, b[:1000] + a[1234:1433] + b[1000:]) is None  # 199: below the threshold


def test_real_calibration_text_does_not_overlap_heldout(shared_dir):
    path = os.path.join(REPO, "build", "calib", "gcide-train.txt")
    if not os.path.isfile(path):
        pytest.skip("build/calib/gcide-train.txt not there (scripts/get_calib.sh not run)")
    text = open(path, encoding="utf-8").read()
    heldout = open(os.path.join(shared_dir, "data", "heldout.txt"), encoding="utf-8").read()
    manifest = json.load(open(path + ".json"))
    assert manifest["chars"] == len(text) > 1_000_000
    assert text.startswith(manifest["first_line"]) and heldout[:2000] not in text
    assert C.shared_substring(text, heldout) is None
