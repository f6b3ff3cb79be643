"""PromptDataModule: batches of list[Sample] of the configured size, seeded order, DistributedSampler splits prompts."""

import pytest
from torch.utils.data import DistributedSampler

from medix.data import PromptDataModule, Sample
from medix.data.datamodule import collate_samples
from medix.errors import ConfigError


def make_samples(n: int, prefix: str = "s") -> list[Sample]:
    return [Sample(f"{prefix}{i}", "Q?", "<CT_SCAN> A", "<CT_SCAN>", "A", [], "t") for i in range(n)]


def ids(batches) -> list[list[str]]:
    return [[s.id for s in batch] for batch in batches]


def test_train_batches_are_lists_of_samples_covering_the_split():
    module = PromptDataModule(make_samples(10), make_samples(3, "v"), batch_size=4, seed=1)
    batches = list(module.train_dataloader())
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(isinstance(b, list) and all(isinstance(s, Sample) for s in b) for b in batches)
    assert sorted(i for b in ids(batches) for i in b) == sorted(f"s{i}" for i in range(10))
    assert ids(module.val_dataloader()) == [["v0", "v1", "v2"]]


def test_train_order_is_seeded():
    first = ids(PromptDataModule(make_samples(12), [], batch_size=3, seed=7).train_dataloader())
    again = ids(PromptDataModule(make_samples(12), [], batch_size=3, seed=7).train_dataloader())
    other = ids(PromptDataModule(make_samples(12), [], batch_size=3, seed=8).train_dataloader())
    assert first == again and first != other


def test_empty_validation_gives_no_loader():
    assert PromptDataModule(make_samples(4), [], batch_size=2).val_dataloader() == []


def test_distributed_sampler_splits_prompts_across_ranks():
    """What Lightning's Trainer does under DDP: rebuild our loader with a DistributedSampler per rank."""
    from lightning.pytorch.utilities.data import _update_dataloader

    module = PromptDataModule(make_samples(8), [], batch_size=2, seed=0)
    per_rank = []
    for rank in range(2):
        sampler = DistributedSampler(module.train, num_replicas=2, rank=rank, shuffle=True, seed=0)
        batches = list(_update_dataloader(module.train_dataloader(), sampler))
        assert [len(b) for b in batches] == [2, 2] and all(isinstance(b, list) for b in batches)
        per_rank.append({s.id for b in batches for s in b})
    assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == {f"s{i}" for i in range(8)}


def test_collate_is_identity_and_worker_processes_work():
    samples = make_samples(4)
    assert collate_samples(tuple(samples)) == samples
    module = PromptDataModule(samples, [], batch_size=2, num_workers=1, seed=0)
    assert sorted(i for b in ids(module.train_dataloader()) for i in b) == ["s0", "s1", "s2", "s3"]


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="batch_size"):
        PromptDataModule(make_samples(4), [], batch_size=0)
    with pytest.raises(ConfigError, match="training split is empty"):
        PromptDataModule([], make_samples(2), batch_size=2)
