"""`reward/<component>/mean|std` over every scored completion (None left out) and `reward/guarded_share` (the share of
completions the degenerate guard stopped), on one process or summed over ranks."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class RewardStatistics(Metric):
    """Count, sum and sum of squares per component (`overall` included); torchmetrics sums them over ranks in
    `compute()`, which every rank must call. The std is the population std."""

    full_state_update = False

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = ["overall", *[n for n in names if n != "overall"]]
        for state in ("count", "total", "squares"):
            self.add_state(state, torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("guard_counts", torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")  # checked, guarded

    def update(self, batch, rows: list[int] | None = None) -> None:
        """Add a RewardBatch's scored values (only `rows` of it, when given)."""
        columns = {"overall": batch.overall, **batch.components}
        for i, name in enumerate(self.names):
            values = columns.get(name) or []
            picked = [values[r] for r in rows] if rows is not None else values
            scored = torch.tensor([float(v) for v in picked if v is not None], dtype=torch.float64)
            self.count[i] += scored.numel()
            self.total[i] += scored.sum().to(self.total.device)
            self.squares[i] += (scored ** 2).sum().to(self.squares.device)
        if batch.guarded is not None:
            reasons = [batch.guarded[r] for r in rows] if rows is not None else batch.guarded
            self.guard_counts += torch.tensor([len(reasons), sum(r is not None for r in reasons)],
                                              dtype=torch.float64, device=self.guard_counts.device)

    def compute(self) -> dict[str, float]:
        out = {}
        for i, name in enumerate(self.names):
            n = float(self.count[i])
            if n:
                mean = float(self.total[i]) / n
                out[f"reward/{name}/mean"] = mean
                out[f"reward/{name}/std"] = math.sqrt(max(float(self.squares[i]) / n - mean * mean, 0.0))
        if float(self.guard_counts[0]):
            out["reward/guarded_share"] = float(self.guard_counts[1]) / float(self.guard_counts[0])
        return out


def reward_metrics(batch, rows: list[int] | None = None) -> dict[str, float]:
    """The statistics of one RewardBatch on this process alone."""
    stats = RewardStatistics(list(batch.components))
    stats.update(batch, rows)
    return stats.compute()
