"""medix.memory: with glibc's mmap threshold fixed, freed activation-sized tensors leave the process's RSS even when
smaller live tensors sit between them (what a backward leaves behind); glibc's default keeps them resident."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from medix.memory import return_freed_memory_to_the_os
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
if sys.argv[1] == "on":
    assert return_freed_memory_to_the_os()
big = torch.ones(8 << 18); del big  # freeing a mapped 8 MB block raises glibc's threshold to 8 MB
before = rss_mb()
kept, freed = [], []
for i in range(300):  # 1 MB activations with small live tensors between them
    freed.append(torch.ones(1 << 18))
    kept.append(torch.ones(1 << 10))
del freed
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_activation_memory_goes_back_to_the_os():
    def retained(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return float(out.stdout.split()[-1])

    assert retained("off") > 200  # glibc's default: the 300 MB freed stay resident
    assert retained("on") < 50
