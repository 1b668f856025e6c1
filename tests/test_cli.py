"""The command line's process settings (``quest_pl.cli``)."""

import sys

import pytest

from quest_pl import cli


class FakeMallopt:
    """Stands in for ctypes' handle on glibc's ``mallopt`` (it takes ``argtypes`` and ``restype``)."""

    def __init__(self):
        self.calls = []

    def __call__(self, param, value):
        self.calls.append((param, value))
        return 1


class FakeLibc:
    def __init__(self):
        self.mallopt = FakeMallopt()


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr("ctypes.CDLL", lambda name: fake)
    monkeypatch.setattr(sys, "platform", "linux")
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    return fake


def test_keep_freed_memory_sets_glibc_thresholds(libc):
    """Blocks up to 32 MiB come from the heap, and the heap is not trimmed below 1 GiB of free memory."""
    cli.keep_freed_memory()
    assert sorted(libc.mallopt.calls) == [(cli.M_MMAP_THRESHOLD, 32 << 20), (cli.M_TRIM_THRESHOLD, 1 << 30)]


@pytest.mark.parametrize("var", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_keep_freed_memory_leaves_the_users_malloc_settings(libc, monkeypatch, var):
    monkeypatch.setenv(var, "65536")
    cli.keep_freed_memory()
    assert libc.mallopt.calls == []
