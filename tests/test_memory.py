"""medix.memory: inside `freed_memory_returned` (the update) freed activation-sized tensors leave the process's RSS
even with smaller live tensors between them; after it, blocks of that size are reused from the heap instead of being
mapped and zeroed again (no page fault per allocation, what generation's growing KV cache needs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, torch
from medix.memory import freed_memory_returned
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
def faults_per_block(n=50):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        block = torch.ones(1 << 18)  # 1 MB, 256 pages
        del block
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n
with freed_memory_returned():
    big = torch.ones(8 << 18); del big  # would raise glibc's own threshold to 8 MB
    before = rss_mb()
    kept, freed = [], []
    for i in range(300):  # 1 MB activations with small live tensors between them
        freed.append(torch.ones(1 << 18))
        kept.append(torch.ones(1 << 10))
    del freed
    retained = rss_mb() - before
    inside = faults_per_block()
after = faults_per_block()
print(json.dumps({"retained_mb": retained, "faults_inside": inside, "faults_after": after}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_the_update_returns_freed_memory_and_the_rest_reuses_it():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["retained_mb"] < 50  # of the 300 MB freed inside
    assert result["faults_inside"] > 200  # each 1 MB block a fresh mapping: one fault per page
    assert result["faults_after"] < 20  # reused from the heap
