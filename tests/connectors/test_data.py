"""Tests for the data connector: order, sharding, sources, DataLoader conversion, data modules."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    default_collate,
)

from fnloop.connectors.data import (
    DataSource,
    IterableSource,
    MapSource,
    ResumeWarning,
    as_source,
    batch_size_of,
    epoch_order,
    from_dataloader,
    limit_batches,
    mix_seed,
    resolve_datamodule,
    shard,
)
from fnloop.errors import ConfigError


class Recording(Dataset):
    """A map-style dataset that records every index it is asked for."""

    def __init__(self, n):
        self.n = n
        self.seen = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.seen.append(int(i))
        return {"x": torch.tensor([float(i), -float(i)]), "i": i}


class Stream(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(torch.arange(self.n, dtype=torch.float32).unsqueeze(1))


class Reiterable:
    """Re-iterable of batches without __len__; counts passes."""

    def __init__(self, n):
        self.n = n
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter([torch.full((2,), float(i)) for i in range(self.n)])


def _ids(batches):
    return [b["i"].tolist() for b in batches]


# --- mix_seed / epoch_order -------------------------------------------------------------------


def test_mix_seed_deterministic_range_and_order_sensitive():
    values = {mix_seed(s, *w) for s in range(4) for w in [(), (0,), (1,), (0, 1), (1, 0)]}
    assert len(values) == 20
    assert all(0 <= v < 2**63 for v in values)
    assert mix_seed(7, 1, 2) == mix_seed(7, 1, 2)
    assert mix_seed(-1) == mix_seed(2**64 - 1)


@pytest.mark.parametrize("bad", [True, 1.5, "3"])
def test_mix_seed_rejects_non_ints(bad):
    with pytest.raises(ConfigError, match="must be an int"):
        mix_seed(bad)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 300), st.integers(0, 2**40), st.integers(0, 1000))
def test_epoch_order_is_a_deterministic_permutation(n, seed, epoch):
    rng_before = torch.get_rng_state()
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=True)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert order.dtype == torch.int64
    assert torch.equal(order.sort().values, torch.arange(n))
    assert torch.equal(order, epoch_order(n, seed=seed, epoch=epoch, shuffle=True))


@pytest.mark.parametrize("n", [0, 1, 17])
def test_epoch_order_identity_without_shuffle(n):
    for epoch in range(3):
        assert torch.equal(epoch_order(n, seed=5, epoch=epoch, shuffle=False), torch.arange(n))


def test_epoch_order_differs_across_epochs_and_seeds():
    orders = [tuple(epoch_order(100, seed=s, epoch=e, shuffle=True).tolist()) for s in range(3) for e in range(5)]
    assert len(set(orders)) == len(orders)


def test_epoch_order_rejects_negative_n():
    with pytest.raises(ConfigError, match="n must be >= 0"):
        epoch_order(-1, seed=0, epoch=0, shuffle=True)


# --- shard ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200), st.integers(1, 9), st.booleans(), st.integers(0, 99))
def test_shard_property(n, world_size, drop_last, seed):
    indices = epoch_order(n, seed=seed, epoch=0, shuffle=True)
    shards = [shard(indices, rank=r, world_size=world_size, drop_last=drop_last) for r in range(world_size)]
    counts = {s.numel() for s in shards}
    assert len(counts) == 1  # the same count on every rank
    count = counts.pop()
    interleaved = torch.stack(shards, 1).reshape(-1) if count else torch.empty(0, dtype=torch.int64)
    if n % world_size == 0:
        assert count == n // world_size
        assert torch.equal(interleaved, indices)  # every index exactly once
    elif drop_last:
        assert count == n // world_size
        assert torch.equal(interleaved, indices[: count * world_size])
    else:
        assert count == math.ceil(n / world_size)
        assert torch.equal(interleaved[:n], indices)  # covers everything once ...
        padding = interleaved[n:]
        wrapped = indices.repeat(count * world_size // n + 1)  # wraps around as often as needed (n < world_size)
        assert torch.equal(padding, wrapped[n : count * world_size])  # ... then wraps around


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 2, "world_size": 2}, "rank must be in"),
        ({"rank": -1, "world_size": 2}, "rank must be in"),
        ({"rank": 0, "world_size": 0}, "world_size must be >= 1"),
    ],
)
def test_shard_rejects_bad_ranks(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        shard(torch.arange(4), **kwargs)


# --- MapSource --------------------------------------------------------------------------------

MAP_CASES = [
    # n, batch_size, shuffle, drop_last, world_size, shard_drop_last
    (10, 3, False, False, 1, False),
    (10, 3, True, False, 1, False),
    (10, 3, True, True, 1, False),
    (11, 2, True, False, 3, False),
    (11, 2, True, True, 3, True),
    (7, 4, False, False, 2, False),
    (0, 2, True, False, 1, False),
]


@pytest.mark.parametrize("n, bs, shuffle, drop_last, ws, sdl", MAP_CASES)
def test_map_source_resume_skips_without_reading(n, bs, shuffle, drop_last, ws, sdl):
    for rank in range(ws):
        kw = dict(batch_size=bs, shuffle=shuffle, drop_last=drop_last, seed=3, rank=rank, world_size=ws)
        kw["shard_drop_last"] = sdl
        full_ds = Recording(n)
        full = _ids(MapSource(full_ds, **kw).batches(2))
        assert len(full) == MapSource(full_ds, **kw).num_batches(2)
        for k in range(len(full) + 2):
            ds = Recording(n)
            resumed = _ids(MapSource(ds, **kw).batches(2, k))
            assert resumed == full[k:]
            assert sorted(ds.seen) == sorted(i for b in full[k:] for i in b)  # skipped samples untouched


def test_map_source_ranks_cover_dataset_and_agree_on_length():
    n, ws = 24, 4
    sources = [MapSource(Recording(n), batch_size=2, shuffle=True, seed=9, rank=r, world_size=ws) for r in range(ws)]
    assert len({s.num_batches(1) for s in sources}) == 1
    seen = sorted(i for s in sources for b in _ids(s.batches(1)) for i in b)
    assert seen == list(range(n))


def test_map_source_order_depends_on_seed_and_epoch_only():
    ds = TensorDataset(torch.arange(50))
    a = MapSource(ds, batch_size=5, shuffle=True, seed=1)
    b = MapSource(ds, batch_size=5, shuffle=True, seed=1)
    order = lambda src, e: [x[0].tolist() for x in src.batches(e)]  # noqa: E731
    assert order(a, 0) == order(b, 0)
    assert order(a, 0) != order(a, 1)
    assert order(a, 0) != order(MapSource(ds, batch_size=5, shuffle=True, seed=2), 0)


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert type(g) is type(e) and len(g) == len(e)
        for gt, et in zip(g, e):
            assert gt.dtype == et.dtype and gt.shape == et.shape
            assert torch.equal(gt, et)


@pytest.mark.parametrize("start", [0, 2])
def test_tensor_dataset_fast_path_equals_dataloader(start):
    ds = TensorDataset(torch.randn(23, 3), torch.arange(23), torch.randint(0, 2, (23,), dtype=torch.bool))
    src = MapSource(ds, batch_size=5, shuffle=True, seed=4)
    fast = list(src.batches(1, start))
    plain_loader = DataLoader(ds, batch_sampler=[c.tolist() for c in src.batch_indices(1)[start:]])
    _assert_same_batches(fast, list(plain_loader))
    slow = MapSource(ds, batch_size=5, shuffle=True, seed=4, collate_fn=lambda b: default_collate(b))
    _assert_same_batches(fast, list(slow.batches(1, start)))


def test_map_source_with_workers_matches_single_process():
    ds = TensorDataset(torch.arange(20.0))
    kw = dict(batch_size=3, shuffle=True, seed=2)
    _assert_same_batches(
        list(MapSource(ds, num_workers=2, **kw).batches(0, 1)), list(MapSource(ds, **kw).batches(0, 1))
    )


def test_map_source_keeps_global_rng():
    before = torch.get_rng_state()
    list(MapSource(Recording(9), batch_size=2, shuffle=True).batches(0, 1))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"rank": 1}, "rank < world_size"),
        ({"batch_size": 2.0}, "batch_size must be an int"),
    ],
)
def test_map_source_rejects_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MapSource(Recording(3), **kwargs)


def test_batches_rejects_negative_start():
    with pytest.raises(ConfigError, match="start must be an int >= 0"):
        MapSource(Recording(3)).batches(0, -1)


# --- from_dataloader --------------------------------------------------------------------------


class EvenSampler(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(0, self.n, 2))

    def __len__(self):
        return (self.n + 1) // 2


@pytest.mark.parametrize(
    "make, kind, shuffle",
    [
        (lambda ds: DataLoader(ds, batch_size=3), MapSource, False),
        (lambda ds: DataLoader(ds, batch_size=3, shuffle=True, drop_last=True), MapSource, True),
        (lambda ds: DataLoader(ds, batch_size=3, sampler=RandomSampler(ds)), MapSource, True),
        (lambda ds: DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 3, False)), MapSource, False),
        (lambda ds: DataLoader(ds, batch_size=3, sampler=EvenSampler(len(ds))), IterableSource, None),
        (lambda ds: DataLoader(ds, batch_size=3, sampler=SubsetRandomSampler([1, 2])), IterableSource, None),
        (lambda ds: DataLoader(ds, batch_size=3, sampler=RandomSampler(ds, replacement=True)), IterableSource, None),
        (lambda ds: DataLoader(ds, batch_sampler=[[0, 1], [2]]), IterableSource, None),
        (lambda ds: DataLoader(ds, batch_size=None), IterableSource, None),
        (lambda ds: DataLoader(Stream(5), batch_size=2), IterableSource, None),
    ],
)
def test_from_dataloader(make, kind, shuffle):
    ds = TensorDataset(torch.arange(10))
    loader = make(ds)
    src = from_dataloader(loader, seed=0)
    assert type(src) is kind and isinstance(src, DataSource)
    if kind is MapSource:
        assert src.shuffle is shuffle
        assert src.batch_size == 3 and src.drop_last == loader.batch_sampler.drop_last
        assert src.collate_fn is loader.collate_fn
        assert src.num_batches(0) == len(loader)
        seen = sorted(i for b in src.batches(0) for i in b[0].tolist())
        assert len(set(seen)) == len(seen) == (9 if src.drop_last else 10)
        if not shuffle:
            assert seen == list(range(len(seen)))
    else:
        assert src.resumable is False


def test_from_dataloader_random_is_seeded_and_sharded():
    loader = DataLoader(TensorDataset(torch.arange(12)), batch_size=2, shuffle=True, num_workers=0)
    sources = [from_dataloader(loader, seed=5, rank=r, world_size=2) for r in (0, 1, 0)]
    runs = [[b[0].tolist() for b in src.batches(3)] for src in sources]
    assert runs[0] == runs[2]
    assert sorted(i for b in runs[0] + runs[1] for i in b) == list(range(12))


# --- IterableSource ---------------------------------------------------------------------------


def test_iterable_source_warns_once_and_never_duplicates():
    data = Reiterable(6)
    src = IterableSource(data, name="train_data")
    full = [b.tolist() for b in src.batches(0)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = [b.tolist() for b in src.batches(0, 4)]
        second = [b.tolist() for b in src.batches(1, 2)]
    assert first == full[4:] and second == full[2:]
    assert [w.category for w in caught] == [ResumeWarning]
    message = str(caught[0].message)
    assert "train_data" in message and "batches 0 to 3" in message and "map-style Dataset" in message
    assert src.num_batches(0) is None and src.resumable is False


def test_iterable_source_sequence_is_resumable_without_warning():
    batches = [torch.full((2,), float(i)) for i in range(5)]
    for data in (batches, tuple(batches)):
        src = IterableSource(data)
        assert src.resumable and src.num_batches(0) == 5
        assert [b[0].item() for b in src.batches(0, 3)] == [3.0, 4.0]  # filterwarnings=error: no warning
        assert list(src.batches(0, 9)) == []


def test_one_shot_iterators_are_rejected():
    gen = (torch.zeros(2) for _ in range(3))
    for data in (gen, iter([torch.zeros(2)])):
        with pytest.raises(ConfigError, match="one-shot iterator.*list"):
            IterableSource(data)
        with pytest.raises(ConfigError, match="val_data is a one-shot"):
            as_source(data, name="val_data")


def test_dataloader_over_iterable_dataset_reads_again():
    src = as_source(DataLoader(Stream(5), batch_size=2))
    assert src.num_batches(0) is None or src.num_batches(0) == 3
    full = [b.tolist() for b in src.batches(0)]
    with pytest.warns(ResumeWarning):
        assert [b.tolist() for b in src.batches(0, 1)] == full[1:]


# --- as_source / batch_size_of ----------------------------------------------------------------


@pytest.mark.parametrize(
    "data, kwargs, kind, n_batches",
    [
        (TensorDataset(torch.zeros(10, 2)), {"batch_size": 4}, MapSource, 3),
        (TensorDataset(torch.zeros(10, 2)), {}, MapSource, 10),
        (Recording(5), {"batch_size": 2, "shuffle": True, "drop_last": True}, MapSource, 2),
        (Stream(5), {"batch_size": 2}, IterableSource, None),
        (DataLoader(TensorDataset(torch.zeros(5)), batch_size=2), {}, MapSource, 3),
        ([torch.zeros(2)] * 4, {}, IterableSource, 4),
        (Reiterable(3), {}, IterableSource, None),
    ],
)
def test_as_source_kinds(data, kwargs, kind, n_batches):
    src = as_source(data, seed=1, **kwargs)
    assert type(src) is kind
    assert src.num_batches(0) == n_batches
    assert as_source(src) is src


def test_as_source_shards_datasets():
    srcs = [as_source(TensorDataset(torch.arange(9)), batch_size=2, rank=r, world_size=3) for r in range(3)]
    assert [s.num_batches(0) for s in srcs] == [2, 2, 2]
    assert sorted(i for s in srcs for b in s.batches(0) for i in b[0].tolist()) == list(range(9))


@pytest.mark.parametrize("bad", [3, None, "abc", {"x": torch.zeros(1)}, object()])
def test_as_source_rejects_other_types(bad):
    with pytest.raises(ConfigError, match="val_data of type .* DataLoader"):
        as_source(bad, name="val_data")


@pytest.mark.parametrize("kwargs", [{"batch_size": 4}, {"shuffle": True}, {"drop_last": True}])
def test_as_source_rejects_dataset_options_for_other_kinds(kwargs):
    with pytest.raises(ConfigError, match="train_data: .* only applies when train_data is a Dataset"):
        as_source(DataLoader(TensorDataset(torch.zeros(4))), **kwargs)


def test_as_source_rejects_shuffle_for_iterable_dataset():
    with pytest.raises(ConfigError, match="shuffle=True cannot apply"):
        as_source(Stream(3), shuffle=True)


@pytest.mark.parametrize(
    "batch, size",
    [
        (torch.zeros(5, 2), 5),
        ((torch.zeros(()), {"y": torch.zeros(3)}), 3),
        ({"text": ["a", "b"], "x": torch.zeros(2, 7)}, 2),
        ([torch.zeros(4)], 4),
    ],
)
def test_batch_size_of(batch, size):
    assert batch_size_of(batch) == size


def test_batch_size_of_without_tensor_is_config_error():
    with pytest.raises(ConfigError, match="batch size of a batch of type dict"):
        batch_size_of({"text": ["a", "b"]})


# --- data modules -----------------------------------------------------------------------------


class DM:
    def __init__(self):
        self.setups = []

    def setup(self, stage):
        self.setups.append(stage)

    def train_data(self):
        return [torch.zeros(1)]

    def val_data(self):
        return None

    def test_dataloader(self):
        return "lightning-test"


def test_resolve_datamodule_setup_once_per_stage_and_fallbacks():
    dm = DM()
    assert resolve_datamodule(dm, "fit") == {"train_data": [torch.zeros(1)]}
    resolve_datamodule(dm, "fit")
    assert resolve_datamodule(dm, "test") == {"test_data": "lightning-test"}
    assert resolve_datamodule(dm, "validate") == {}
    assert resolve_datamodule(dm, "predict") == {}
    assert dm.setups == ["fit", "test", "validate", "predict"]
    assert resolve_datamodule(DM(), "fit") == {"train_data": [torch.zeros(1)]}  # a new module sets up again


def test_resolve_datamodule_ignores_lightning_placeholders():
    LightningBase = type(
        "LightningDataModule",
        (),
        {
            "__module__": "lightning.pytorch.core.datamodule",
            "val_dataloader": lambda self: 1 / 0,
            "setup": lambda self, stage: 1 / 0,
        },
    )
    User = type("User", (LightningBase,), {"train_dataloader": lambda self: [1]})
    assert resolve_datamodule(User(), "fit") == {"train_data": [1]}


def test_resolve_datamodule_rejects_unknown_stage():
    with pytest.raises(ConfigError, match="stage='train'.*'fit'"):
        resolve_datamodule(DM(), "train")


# --- limit_batches ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, limit, expected",
    [
        (10, 3, 3),
        (10, 30, 10),
        (10, 0, 0),
        (10, 0.25, 2),
        (10, 1.0, 10),
        (10, 0.0, 0),
        (10, 5.0, 5),
        (10, None, 10),
        (0, 0.5, 0),
        (None, 4, 4),
        (None, 1.0, None),
    ],
)
def test_limit_batches(n, limit, expected):
    assert limit_batches(n, limit, flag="limit_val_batches") == expected


@pytest.mark.parametrize(
    "n, limit, match",
    [
        (10, -1, "limit_train_batches=-1 is not valid"),
        (10, 1.5, "float in \\[0.0, 1.0\\]"),
        (10, float("nan"), "is not valid"),
        (10, True, "is not valid"),
        (10, "all", "is not valid"),
        (10, 0.05, "raise limit_train_batches to at least 0.1"),
        (None, 0.5, "no known length"),
    ],
)
def test_limit_batches_errors(n, limit, match):
    with pytest.raises(ConfigError, match=match):
        limit_batches(n, limit, flag="limit_train_batches")
