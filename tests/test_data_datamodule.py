"""PromptDataModule: PromptBatches of the configured size in a seeded order per epoch, sharded over ranks with
every rank as long as the others, DAPO refills from a rank's own shard, and a mid-epoch resume."""

import random

import lightning as L
import pytest
import torch
from PIL import Image

from medix.data import PromptDataModule, Sample
from medix.data.datamodule import PromptBatch, ShardedBatches
from medix.errors import ConfigError


def make_samples(n: int, prefix: str = "s") -> list[Sample]:
    return [Sample(f"{prefix}{i}", "Q?", "<CT_SCAN> A", "<CT_SCAN>", "A", [], "t") for i in range(n)]


def module(train, val=(), **kwargs) -> PromptDataModule:
    return PromptDataModule.from_samples(train, list(val), **{"batch_size": 2, "seed": 0, **kwargs})


def ids(loader) -> list[list[str]]:
    return [[s.id for s in batch.samples] for batch in loader]


def test_train_batches_are_prompt_batches_covering_the_split():
    data = module(make_samples(10), make_samples(3, "v"), batch_size=4, val_batch_size=8, seed=1)
    batches = list(data.train_dataloader())
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(isinstance(b, PromptBatch) and b.images is None and all(b.counted) for b in batches)
    assert sorted(i for b in ids(batches) for i in b) == sorted(f"s{i}" for i in range(10))
    assert ids(data.val_dataloader()) == [["v0", "v1", "v2"]]


def test_the_order_is_seeded_and_changes_with_the_epoch():
    loader = module(make_samples(12), batch_size=3, seed=7).train_dataloader()
    first = ids(loader)
    assert first == ids(module(make_samples(12), batch_size=3, seed=7).train_dataloader())
    assert first != ids(module(make_samples(12), batch_size=3, seed=8).train_dataloader())
    loader.batch_sampler.set_epoch(1)
    assert ids(loader) != first and sorted(sum(ids(loader), [])) == sorted(sum(first, []))


class BatchRecorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[list[str]]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append([s.id for s in batch.samples])
        return (self.weight * 0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_lightning_fit_shuffles_each_epoch_anew_and_the_producer_sees_the_same_order():
    data = module(make_samples(12), batch_size=3, seed=7)
    recorder = BatchRecorder()
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False).fit(recorder, datamodule=data)
    epochs = [recorder.seen[e] for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert all(sorted(sum(e, [])) == sorted(f"s{i}" for i in range(12)) for e in epochs)
    served = [batch for e in epochs for batch in e]
    assert [[s.id for s in data.train_batch(p).samples] for p in range(len(served))] == served


def test_ranks_get_disjoint_shards_of_equal_length_the_extras_not_counted():
    shards = [list(ShardedBatches(7, 2, shuffle=True, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2] == [len(ShardedBatches(7, 2, shuffle=True, seed=0, rank=r,
                                                                         world_size=3)) for r in range(3)]
    items = [item for shard in shards for batch in shard for item in batch]
    counted = sorted(i for i, c in items if c)
    assert counted == list(range(7)) and len(items) == 9  # 7 real items, 2 repeats to even out the ranks
    assert all(i in counted for i, c in items if not c)


def test_resume_skips_the_batches_already_done_in_that_epoch_only():
    order = ShardedBatches(10, 2, shuffle=True, seed=3)
    full = list(order)
    order.resume(epoch=0, batches=3)
    assert list(order) == full[3:]
    assert list(order) == full  # only the first iteration after the resume skips
    order.resume(epoch=1, batches=3)
    assert list(order) == full  # a resume into another epoch does not touch this one


def test_state_dict_round_trip_restarts_the_loader_at_the_data_position():
    data = module(make_samples(8), batch_size=2, seed=5)
    full = ids(data.train_dataloader())
    data.load_state_dict({"epoch": 0, "batches_done": 2})
    assert ids(data.train_dataloader()) == full[2:]
    assert data.state_dict() == {}  # without a trainer there is no position to report


def test_refill_draws_from_this_ranks_shard_with_the_given_rng():
    data = module(make_samples(6))
    first = data.refill(3, random.Random(1))
    assert [s.id for s in first.samples] == [s.id for s in data.refill(3, random.Random(1)).samples]
    assert len(first) == 3 and all(first.counted) and first.images is None
    assert len(data.refill(50, random.Random(1))) == 6


def test_images_are_loaded_in_the_batch_with_the_pixel_bounds(tmp_path):
    path = tmp_path / "scan.png"
    Image.new("L", (40, 20), 128).save(path)
    samples = [Sample("a", "Q?", "<X_RAY> A", "<X_RAY>", "A", [str(path), str(path)], "t"),
               Sample("b", "Q?", "<X_RAY> A", "<X_RAY>", "A", [], "t")]
    data = module(samples, min_pixels=3200, max_pixels=3200)
    batch = data.collate([(samples[0], True), (samples[1], False)])
    assert [len(row) for row in batch.images] == [2, 0] and batch.counted == [True, False]
    assert batch.images[0][0].size == (80, 40) and batch.images[0][0].mode == "RGB"
    joined = PromptBatch.concat([batch, PromptBatch([samples[1]], None, [True])])
    assert [len(row) for row in joined.images] == [2, 0, 0] and joined.select([0]).images == [batch.images[0]]


def test_worker_processes_give_the_same_batches():
    samples = make_samples(4)
    assert ids(module(samples, num_workers=1).train_dataloader()) == ids(module(samples).train_dataloader())


@pytest.mark.parametrize("kwargs, key", [({"batch_size": 0}, "dataset.batch_size"),
                                         ({"val_batch_size": 0}, "dataset.val_batch_size"),
                                         ({"min_pixels": 10, "max_pixels": 5}, "dataset.min_pixels")])
def test_bad_sizes_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        module(make_samples(4), **kwargs)


def test_an_empty_training_split_is_a_config_error():
    with pytest.raises(ConfigError, match="training split is empty"):
        module([], make_samples(2)).train_dataloader()
