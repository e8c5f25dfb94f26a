"""keep_freed_memory_for_reuse: glibc serves large tensors from its heap and keeps freed memory mapped."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from diffusers_cunet.training import hardware, keep_freed_memory_for_reuse

# Allocates and frees one 20 MiB tensor before and after the call, and prints, for each, the bytes glibc mapped for
# it apart from its heap and the free bytes its heap kept afterwards (mallinfo2, glibc 2.33 and later).
HEAP_PROBE = """
import ctypes, torch
from diffusers_cunet.training import keep_freed_memory_for_reuse

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def allocate_and_free():
    before = libc.mallinfo2().hblkhd
    tensor = torch.ones(5 << 20)
    mapped = libc.mallinfo2().hblkhd - before
    del tensor
    return mapped, libc.mallinfo2().fordblks

print(*allocate_and_free(), keep_freed_memory_for_reuse(), *allocate_and_free())
"""

MIB = 1 << 20


def has_mallinfo2() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc 2.33 or later")
def test_large_tensor_memory_kept_in_heap():
    # A fresh process, because the setting lasts for the process's lifetime.
    result = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, timeout=120, check=True)
    mapped_before, free_before, applied, mapped_after, free_after = result.stdout.split()

    assert applied == "True"
    # With glibc's defaults, the 20 MiB tensor gets its own mapping, which freeing it hands back to the system.
    assert int(mapped_before) >= 20 * MIB
    assert int(free_before) < 20 * MIB
    # Afterwards it comes from the heap, and the heap keeps the freed 20 MiB for the next allocation.
    assert int(mapped_after) == 0
    assert int(free_after) >= 20 * MIB


def test_other_platforms_left_alone(monkeypatch):
    monkeypatch.setattr(hardware.sys, "platform", "darwin")
    assert keep_freed_memory_for_reuse() is False


@pytest.mark.parametrize("argument", ["mmap_threshold", "trim_threshold"])
@pytest.mark.parametrize("value", [-1, 2**31])
def test_out_of_range_thresholds_rejected(argument, value):
    # 2**31 does not fit mallopt's C int, which would wrap it to a negative threshold.
    with pytest.raises(ValueError, match=f"{argument}={value} is invalid"):
        keep_freed_memory_for_reuse(**{argument: value})
