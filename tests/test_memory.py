"""medix.memory: inside `freed_memory_returned` freed activation-sized tensors leave the process's RSS even with
smaller live tensors between them; after it, blocks of that size are reused from the heap instead of being mapped and
zeroed again (no page fault per allocation, what generation's growing KV cache needs). With the update's `heap_below`,
blocks under it are reused inside too, while larger ones still leave RSS when freed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, torch
from medix.memory import UPDATE_HEAP_BYTES, freed_memory_returned
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
def faults_per_block(n=50, numel=1 << 18):  # 1 MB, 256 pages
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        block = torch.ones(numel)
        del block
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n
def retained_mb(numel, count):  # RSS kept after `count` blocks of `numel` floats, small live tensors between, are freed
    before = rss_mb()
    kept, freed = [], []
    for i in range(count):
        freed.append(torch.ones(numel))
        kept.append(torch.ones(1 << 10))
    del freed
    return rss_mb() - before
with freed_memory_returned():
    big = torch.ones(8 << 18); del big  # would raise glibc's own threshold to 8 MB
    retained = retained_mb(1 << 18, 300)  # 300 blocks of 1 MB
    inside = faults_per_block()
after = faults_per_block()
with freed_memory_returned(heap_below=UPDATE_HEAP_BYTES):
    update_small = faults_per_block()
    update_large = faults_per_block(n=10, numel=2 << 20)  # 8 MB, 2048 pages
    update_retained = retained_mb(2 << 20, 40)  # 40 blocks of 8 MB
print(json.dumps({"retained_mb": retained, "faults_inside": inside, "faults_after": after,
                  "update_faults_small": update_small, "update_faults_large": update_large,
                  "update_retained_mb": update_retained}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_the_update_returns_freed_memory_and_the_rest_reuses_it():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["retained_mb"] < 50  # of the 300 MB freed inside
    assert result["faults_inside"] > 200  # each 1 MB block a fresh mapping: one fault per page
    assert result["faults_after"] < 20  # reused from the heap
    assert result["update_faults_small"] < 20  # 1 MB blocks under the update's 4 MiB: reused from the heap inside
    assert result["update_faults_large"] > 1500  # 8 MB blocks: mappings of their own, as before
    assert result["update_retained_mb"] < 50  # of the 320 MB of 8 MB blocks freed inside
