"""The Lightning DataModule of a training run: the configured dataset split into training and held-out prompts,
served as `PromptBatch`es in a seeded order that is sharded over ranks and resumes mid-epoch."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from medix.data.images import load_image
from medix.data.samples import LoadReport, Sample, split_samples
from medix.data.sources import load_report
from medix.errors import ConfigError


@dataclass
class PromptBatch:
    """Prompts of one step: the samples, each one's images (None when no sample has any), and which rows count in
    metrics (False for the repeats that give every rank as many rows as the others)."""

    samples: list[Sample]
    images: list[list[Any]] | None
    counted: list[bool]

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, rows: list[int]) -> "PromptBatch":
        return PromptBatch([self.samples[i] for i in rows], None if self.images is None else [self.images[i] for i in rows],
                           [self.counted[i] for i in rows])

    @staticmethod
    def concat(batches: list["PromptBatch"]) -> "PromptBatch":
        images = None
        if any(b.images is not None for b in batches):
            images = [row for b in batches for row in (b.images or [[] for _ in b.samples])]
        return PromptBatch([s for b in batches for s in b.samples], images, [c for b in batches for c in b.counted])


class ShardOrder(Sampler[tuple[int, bool]]):
    """This rank's shard of `n` items as (index, counted): a fresh seeded shuffle each epoch (`set_epoch`) or the
    plain order. Every rank gets the same number of items (the order is topped up with its first items, marked not
    counted), so data-parallel ranks run the same number of steps."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        items = [(i, True) for i in order]
        items += [(i, False) for i, _ in (items * len(self))[:len(self) * self.world_size - self.n]]
        return iter(items[self.rank::self.world_size])

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)


class ShardedBatches(Sampler[list[tuple[int, bool]]]):
    """Batches of `batch_size` over a `ShardOrder` (`.sampler`, as torch's BatchSampler names it: Lightning calls
    `set_epoch` there at each epoch start). `resume(epoch, batches)` makes that epoch's iteration start after its
    first `batches` batches."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.sampler = ShardOrder(n, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
        self.batch_size = batch_size
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def resume(self, epoch: int, batches: int) -> None:
        self._resume = (epoch, batches)

    def __iter__(self):
        shard = list(self.sampler)
        batches = [shard[i:i + self.batch_size] for i in range(0, len(shard), self.batch_size)]
        skip = 0
        if self._resume is not None and self._resume[0] == self.sampler.epoch:
            skip = self._resume[1]
        self._resume = None
        yield from batches[skip:]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


class _Items(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __getitem__(self, item: tuple[int, bool]) -> tuple[Sample, bool]:
        index, counted = item
        return self.samples[index], counted

    def __len__(self) -> int:
        return len(self.samples)


class PromptDataModule(L.LightningDataModule):
    """`dataset=<choice>` (conf/dataset): loads and validates the rows, splits off `val_size` held-out prompts
    (seeded), and serves `batch_size` prompts per GRPO step (their G completions are the algorithm's)."""

    def __init__(self, *, name: str, path: str | None = None, hub_id: str | None = None, split: str | None = None,
                 image_dir: str | None = None, val_size: int | float = 16, seed: int = 0, on_bad_row: str = "error",
                 min_pixels: int = 262144, max_pixels: int = 4194304, batch_size: int = 2, val_batch_size: int = 8,
                 num_workers: int = 0):
        super().__init__()
        for key, value, least in (("batch_size", batch_size, 1), ("val_batch_size", val_batch_size, 1),
                                  ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < least:
                raise ConfigError(f"dataset.{key}={value!r}; expected an integer >= {least}")
        if not 0 < min_pixels <= max_pixels:
            raise ConfigError(f"dataset.min_pixels={min_pixels} and dataset.max_pixels={max_pixels}: need "
                              "0 < min_pixels <= max_pixels (the paper uses 262144 and 4194304)")
        self.source = {"name": name, "path": path, "hub_id": hub_id, "split": split, "image_dir": image_dir,
                       "on_bad_row": on_bad_row}
        self.val_size, self.seed = val_size, seed
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.report: LoadReport | None = None
        self.train: list[Sample] = []
        self.val: list[Sample] = []
        self._resume: dict | None = None

    # ---- loading ------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load, validate and split once (a bad row is a DataError naming it)."""
        if self.report is not None:
            return
        self.report = load_report(self.source)
        self.train, self.val = split_samples(self.report.samples, self.val_size, self.seed)

    @classmethod
    def from_samples(cls, train: list[Sample], val: list[Sample], **kwargs) -> "PromptDataModule":
        """A DataModule over samples already in memory (tests, notebooks)."""
        module = cls(name="in_memory", **kwargs)
        module.report = LoadReport(list(train) + list(val))
        module.train, module.val = list(train), list(val)
        return module

    # ---- loaders ------------------------------------------------------------------------------------------------
    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, samples: list[Sample], batch_size: int, shuffle: bool) -> DataLoader:
        rank, world = self._ranks()
        order = ShardedBatches(len(samples), batch_size, shuffle=shuffle, seed=self.seed, rank=rank, world_size=world)
        return DataLoader(_Items(samples), batch_sampler=order, collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if not self.train:
            raise ConfigError("the training split is empty; lower dataset.val_size")
        loader = self._loader(self.train, self.batch_size, shuffle=True)
        if self._resume is not None:
            loader.batch_sampler.resume(self._resume["epoch"], self._resume["batches_done"])
            self._resume = None
        return loader

    def train_batch(self, position: int) -> PromptBatch:
        """The training batch of GRPO step `position` (0-based, counted over epochs), the one the training loader
        serves at that step on this rank: epoch position // batches per epoch, its shuffle, that batch. The rollout
        producer (rollout.max_staleness >= 1) samples it ahead of the loader."""
        if not self.train:
            raise ConfigError("the training split is empty; lower dataset.val_size")
        rank, world = self._ranks()
        order = ShardedBatches(len(self.train), self.batch_size, shuffle=True, seed=self.seed, rank=rank,
                               world_size=world)
        epoch, index = divmod(position, len(order))
        order.set_epoch(epoch)
        return self.collate([(self.train[i], counted) for i, counted in list(order)[index]])

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val, self.val_batch_size, shuffle=False) if self.val else []

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # prompts and PIL images; the backbone makes tensors on the device during the rollout

    def collate(self, rows: list[tuple[Sample, bool]]) -> PromptBatch:
        samples = [s for s, _ in rows]
        return PromptBatch(samples, self.images_of(samples), [c for _, c in rows])

    def images_of(self, samples: list[Sample]) -> list[list[Any]] | None:
        if not any(s.images for s in samples):
            return None
        return [[load_image(Path(p), min_pixels=self.min_pixels, max_pixels=self.max_pixels) for p in s.images]
                for s in samples]

    def refill(self, count: int, rng: random.Random) -> PromptBatch:
        """`count` training prompts drawn with `rng` from this rank's shard (DAPO's dynamic sampling)."""
        rank, world = self._ranks()
        pool = self.train[rank::world]
        picked = rng.sample(pool, min(count, len(pool)))
        return PromptBatch(picked, self.images_of(picked), [True] * len(picked))

    # ---- resuming mid-epoch -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the data order stands: the epoch and how many of its batches finished a training step (a step that
        failed has not, so a resumed run redoes it)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        return {"epoch": trainer.current_epoch,
                "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) if state else None
