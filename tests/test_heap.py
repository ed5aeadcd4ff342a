"""glibc keeps a decode step's temporaries in its heap once `keep_freed_memory` has run."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys, torch
from toolbox.runtime.heap import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print("no mallinfo2"); sys.exit()
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    print(keep_freed_memory())
for _ in range(3):  # a block the size of a batch's logits, allocated and freed as each step does
    before = libc.mallinfo2()
    x = torch.ones(4 << 20 >> 2)
    during = libc.mallinfo2()
    del x
    after = libc.mallinfo2()
    print(during.hblks - before.hblks, after.fordblks >= 4 << 20)
"""


def _probe(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    if out.startswith("no mallinfo2"):
        pytest.skip("the C library is not glibc >= 2.33")
    return out.split("\n")[:-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_step_sized_blocks_stay_in_the_heap():
    # glibc's default maps a 4 MiB block and unmaps it when freed (then raises its threshold)
    assert _probe("default")[0] == "1 False"
    kept = _probe("keep")
    assert kept[0] == "True"
    assert kept[1:] == ["0 True"] * 3  # from the heap, and kept there once freed
