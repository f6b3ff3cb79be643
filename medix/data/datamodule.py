"""Lightning DataModule over prompts: batches are plain list[Sample]; under DDP Lightning splits prompts across ranks."""

import lightning as L
import torch
from torch.utils.data import DataLoader

from medix.data.samples import Sample
from medix.errors import ConfigError


def collate_samples(batch: list[Sample]) -> list[Sample]:
    """Identity collate: the rollout needs the samples themselves, not tensors."""
    return list(batch)


class PromptDataModule(L.LightningDataModule):
    """Train/val prompt lists -> DataLoaders of `batch_size` prompts (completions per prompt are the algorithm's)."""

    def __init__(self, train: list[Sample], val: list[Sample], batch_size: int, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"prompts per step (batch_size) is {batch_size}; expected >= 1")
        if not train:
            raise ConfigError("the training split is empty; lower dataset.val_size")
        self.train, self.val = list(train), list(val)
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)

    def _loader(self, samples: list[Sample], shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(samples, batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=collate_samples, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val, shuffle=False) if self.val else []
