import ctypes
import sys

import pytest

from mri_assets.core import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tunes_glibc_once_and_reports_it(monkeypatch):
    calls = []
    real = ctypes.CDLL("libc.so.6")

    class RecordingLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return real.mallopt(param, value)

    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: RecordingLibc())
    assert allocator.keep_freed_memory_for_reuse()
    assert allocator.keep_freed_memory_for_reuse()  # the second call changes nothing
    assert calls == [
        (allocator.M_MMAP_THRESHOLD, allocator.KEEP_BYTES),
        (allocator.M_TRIM_THRESHOLD, allocator.KEEP_BYTES),
    ]


def test_a_libc_without_mallopt_is_left_alone(monkeypatch):
    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", no_glibc)
    assert allocator.keep_freed_memory_for_reuse() is False


def test_a_refused_setting_is_reported(monkeypatch):
    class RefusingLibc:
        def mallopt(self, param, value):
            return 0

    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: RefusingLibc())
    assert allocator.keep_freed_memory_for_reuse() is False
