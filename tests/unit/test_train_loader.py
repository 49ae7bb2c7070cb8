"""The training loader keeps one iterator (and its workers) across epochs, and can start it before the first batch
is asked for, so the workers prepare it while the run gets ready."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from yoloscale.data import EpochBatches, ShardSampler, TrainLoader


class Numbers(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> int:
        return i


def _loader(persistent: bool) -> TrainLoader:
    batches = EpochBatches(ShardSampler(Numbers(), 0, 1, shuffle=False, seed=0), 4)
    loader = DataLoader(
        Numbers(), batch_sampler=batches, num_workers=2, persistent_workers=persistent, prefetch_factor=2
    )
    return TrainLoader(loader, batches)


EPOCH = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("persistent", [True, False])
def test_a_started_loader_goes_on_where_it_stands_and_epochs_follow_each_other(persistent):
    loader = _loader(persistent)
    assert not loader.started
    loader.start(0)
    started = loader._iterator
    assert [b.tolist() for b in loader.epoch(0)] == EPOCH
    assert loader._iterator is started  # the first epoch used the iterator started early
    assert [b.tolist() for b in loader.epoch(1)] == EPOCH
    assert (loader._iterator is started) == persistent  # persistent workers serve every epoch
    assert [b.tolist() for b in loader.epoch(1, skip=1)] == EPOCH[1:]  # a resume's position: a new iterator there
    assert isinstance(next(iter(loader)), torch.Tensor)
