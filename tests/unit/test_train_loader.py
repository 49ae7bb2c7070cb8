"""The training loader keeps one iterator (and its workers) across epochs, and can start it before the first batch
is asked for, so the workers prepare it while the run gets ready."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from yoloscale.training.data import EpochBatches, ShardSampler, TrainLoader


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


class Sized(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("n", [17, 21, 24])
def test_rect_batches_are_whole_shape_groups_and_every_rank_takes_as_many(n):
    """rect: the dataset's groups of 4 consecutive images share one shape; each batch is one group."""
    ranks = []
    for rank in range(2):
        batches = EpochBatches(ShardSampler(Sized(n), rank, 2, shuffle=True, seed=0, groups_of=4), 4)
        it = iter(batches)
        ranks.append([next(it) for _ in range(len(batches))])
        assert all(len({i // 4 for i in batch}) == 1 for batch in ranks[-1])  # one group per batch
    assert len(ranks[0]) == len(ranks[1]) == -(-(-(-n // 4)) // 2)
    assert set(range(n)) <= {i for r in ranks for b in r for i in b}  # every image is taken
    sampler = ShardSampler(Sized(n), 1, 2, shuffle=True, seed=0, groups_of=4)
    sampler.set_epoch(0, skip=4)  # a resume after one batch
    assert list(sampler)[:4] == ranks[1][1]
