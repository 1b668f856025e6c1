"""Atomic writes: the previous file survives a failed write, no temporary file is left, JSON stays strict."""

import json
import math

import pytest

from quest_pl.io import TMP_PREFIX, atomic_path, atomic_write_json, atomic_write_text


def test_replaces_content(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "last.ckpt"
    p.write_bytes(b"good")
    with pytest.raises(OSError), atomic_path(p) as tmp:
        tmp.write_bytes(b"par")  # half-written, then the disk fills
        raise OSError(28, "No space left on device")
    assert p.read_bytes() == b"good"
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(TMP_PREFIX)]


def test_temp_file_is_beside_the_destination(tmp_path):
    p = tmp_path / "sub" / "x.bin"
    with atomic_path(p) as tmp:
        assert tmp.parent == p.parent
        tmp.write_bytes(b"x")
    assert p.read_bytes() == b"x"


def test_json_has_no_bare_nan(tmp_path):
    p = tmp_path / "metrics.json"
    atomic_write_json(p, {"val/loss": math.nan, "steps": [1.0, math.inf], "ok": 1})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"val/loss": None, "steps": [1.0, None], "ok": 1}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_file_has_the_permissions_open_would_give(tmp_path, umask):
    """A checkpoint, export or metrics file is readable by whoever a plain open() would let read it (mkstemp alone
    creates 0600: a shared run or export directory would be unreadable to colleagues)."""
    import os
    import stat

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with open(tmp_path / "b.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o666 & ~umask
