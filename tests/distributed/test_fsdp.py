"""2-rank FSDP on CPU (gloo), each rank a process started as torchrun starts it; see
``_procs/fsdp_worker.py``. One launch (free port, hard timeout, everything killed and joined)
runs DDP, FSDP and an FSDP resume in the same process group.

What is compared:

* FSDP's params after training equal DDP's (same data, same per-rank dropout masks, gradients
  clipped by their whole norm) to 1e-5, and
  so does the validation loss; the fast step equals ``apply_train_step`` bitwise on the shards;
* each rank holds about half of the params and optimizer state (<= 0.6 of the whole);
* the sharded checkpoint (one file per rank, one ``meta.json``) restores onto 1 process
  bitwise equal to the gathered state, and the 1-process continuation from it equals the
  continuation of that gathered state bitwise;
* a 1-process checkpoint restores onto 2 FSDP ranks, whose continuation equals the 1-process
  continuation to 1e-5;
* SIGTERM to one rank stops both at the same step, and together they save a sharded checkpoint
  of that state.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

import fnloop as fl

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_procs"))
import ddp_worker as w  # noqa: E402
import fsdp_worker as fw  # noqa: E402
from ranks import launch, shard_batches  # noqa: E402

TIMEOUT = 120


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's two per-rank micro-batches together: what one process trains on."""
    return [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(shard_batches(0), shard_batches(1))]


def one_rank(max_steps: int, ckpt: str | None = None, ckpt_path: str | None = None) -> fl.TrainState:
    trainer = fl.Trainer(max_steps=max_steps, gradient_clip_val=0.5, enable_progress_bar=False, logger=None)
    checkpoint = fl.ModelCheckpoint(fl.CheckpointManager(ckpt, keep_last=1)) if ckpt else None
    state = fl.TrainState.create(w.model(0.0), w.tx(), seed=w.SEED)
    return trainer.fit(state, fl.train_step(w.loss_fn), global_batches(), checkpoint=checkpoint, ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    one_rank(fw.STEPS, ckpt=str(out / "one-rank-dir"))
    (out / "one-rank-dir" / f"step-{fw.STEPS:08d}").rename(out / "one-rank")
    results = launch("fsdp_worker.py", [str(out)], TIMEOUT)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-3000:] for r in results]
    return out, [torch.load(out / f"fsdp-{rank}.pt") for rank in range(2)]


def test_fsdp_equals_ddp(run):
    _, ranks = run
    for r in ranks:
        torch.testing.assert_close(r["fsdp"], r["ddp"], rtol=0, atol=1e-5)
    assert torch.equal(ranks[0]["fsdp"], ranks[1]["fsdp"])


def test_fsdp_validates_like_ddp_and_its_fast_step_equals_the_meaning(run):
    _, ranks = run
    for r in ranks:
        ddp, fsdp = r["val"]
        assert ddp.keys() == fsdp.keys() and abs(ddp["val/loss"] - fsdp["val/loss"]) < 1e-5
        assert r["fast_equals_pure"]


def test_each_rank_holds_about_half_of_params_and_optimizer_state(run):
    _, ranks = run
    for r in ranks:
        assert r["rank_bytes"] <= 0.6 * r["whole_bytes"]
    assert ranks[0]["local_shapes"]["0.weight"] == (8, 6) and ranks[1]["local_shapes"]["3.weight"] == (0, 16)


def test_sharded_checkpoint_restores_on_the_same_ranks_bitwise(run):
    _, ranks = run
    assert [r["restores_on_two_ranks"] for r in ranks] == [True, True]


def test_checkpoint_has_one_shard_per_rank_and_one_commit_marker(run):
    out, _ = run
    (folder,) = [p for p in (out / "ckpt-fsdp").iterdir()]
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format_version"] == 4 and [s["file"] for s in meta["shards"]] == ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]


def test_sharded_checkpoint_restores_on_one_process_and_continues_bitwise(run):
    out, ranks = run
    (folder,) = [p for p in (out / "ckpt-fsdp").iterdir()]
    like = fl.TrainState.create(w.model(0.1), w.tx(), seed=w.SEED)
    restored = fl.restore(str(folder), like=like)
    assert torch.equal(w.flat(restored.params), ranks[0]["fsdp"])
    for a, b in zip(fl.tree_leaves(restored.opt_state), ranks[0]["fsdp_opt"]):
        assert torch.equal(a, b)
    gathered = restored.replace(
        params={k: v.clone() for k, v in restored.params.items()},
        opt_state=fl.tree_unflatten(fl.tree_structure(restored.opt_state), [t.clone() for t in ranks[0]["fsdp_opt"]]),
    )
    step, batches = fl.train_step(w.loss_fn), global_batches()[fw.STEPS : fw.STEPS + 3]
    a, b = restored, gathered
    for batch in batches:
        a, _ = step(a, batch)
        b, _ = step(b, batch)
    fl.testing.assert_trees_equal(a.params, b.params)
    fl.testing.assert_trees_equal(a.opt_state, b.opt_state)


def test_one_process_checkpoint_restores_onto_two_fsdp_ranks(run):
    out, ranks = run
    reference = one_rank(2 * fw.STEPS, ckpt=str(out / "one-rank-dir"), ckpt_path=str(out / "one-rank"))
    for r in ranks:
        assert r["resumed_step"] == 2 * fw.STEPS
        torch.testing.assert_close(r["resumed"], w.flat(reference.params), rtol=0, atol=1e-5)


def test_sigterm_to_one_rank_saves_the_sharded_state_of_both(run):
    out, ranks = run
    statuses = [r["interrupted"][:2] for r in ranks]
    assert statuses == [("interrupted", 3), ("interrupted", 3)]
    (folder,) = [p for p in (out / "ckpt-interrupt").iterdir()]
    restored = fl.restore(str(folder), like=fl.TrainState.create(w.model(0.1), w.tx(), seed=w.SEED))
    assert restored.loop.global_step == 3 and torch.equal(w.flat(restored.params), ranks[0]["interrupted"][2])


def _flip_last_byte(folder: pathlib.Path) -> None:
    path = folder / "shard-00001-of-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _shards_of_one_file(folder: pathlib.Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta["shards"] = meta["shards"][:1]
    (folder / "meta.json").write_text(json.dumps(meta))


DAMAGE = [
    (_flip_last_byte, r"shard-00001-of-00002\.safetensors: checksum mismatch"),
    (lambda folder: (folder / "shard-00001-of-00002.safetensors").unlink(), r"shard-00001-of-00002\.safetensors: missing"),
    (_shards_of_one_file, r"checksum mismatch of meta\.json"),  # an edited meta.json breaks its seal first
]


@pytest.mark.parametrize("damage, message", DAMAGE, ids=["corrupt shard", "missing shard", "shards of meta.json"])
def test_a_damaged_sharded_checkpoint_is_refused_naming_the_file(run, tmp_path, damage, message):
    import shutil

    out, _ = run
    (folder,) = [p for p in (out / "ckpt-fsdp").iterdir()]
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    damage(copy)
    with pytest.raises(fl.CheckpointError, match=message):
        fl.restore(str(copy), like=fl.TrainState.create(w.model(0.1), w.tx(), seed=w.SEED))


def test_a_sharded_checkpoint_checks_like_by_key_path(run):
    out, _ = run
    (folder,) = [p for p in (out / "ckpt-fsdp").iterdir()]
    wider = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    with pytest.raises(fl.CheckpointError, match=r"params/0\.weight: expected tensor float32\[8, 6\], found tensor float32\[16, 6\]"):
        fl.restore(str(folder), like=fl.TrainState.create(wider, w.tx(), seed=w.SEED))
    assert fl.restore(str(folder))["params/0.weight"].shape == (16, 6)


@pytest.mark.parametrize("n, world, expected", [(5, 2, [(0, 3), (3, 5)]), (1, 2, [(0, 1), (1, 1)]), (0, 2, [(0, 0), (0, 0)]), (4, 1, [(0, 4)])])
def test_chunks_are_torchs_shard0_rows(n, world, expected):
    from fnloop.connectors.fsdp import chunks

    assert chunks(n, world) == expected


@pytest.mark.parametrize("flags", [dict(accumulate_grad_batches=2), dict(skip_nonfinite=True), dict(precision="16-mixed")])
def test_options_a_sharded_step_does_not_support_name_the_strategy(flags):
    from fnloop.connectors.fsdp import ShardedReducer
    from fnloop.options import StepOptions

    with pytest.raises(fl.ConfigError, match=r"strategy='fsdp'"):
        StepOptions(**flags, grad_reduce=ShardedReducer(0, 2))


@pytest.mark.parametrize("kwargs", [dict(process_group_backend="mpi"), dict(timeout_s=0)])
def test_fsdp_strategy_rejects_bad_options(kwargs):
    with pytest.raises(fl.ConfigError, match="FSDPStrategy"):
        fl.FSDPStrategy(**kwargs)


# --- one rank in this process: the sharded code paths against the plain step -------------------


@pytest.fixture
def world_of_one():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Scaled(torch.nn.Module):
    """A linear layer times a 0-d parameter (whole on every rank, never sharded)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 1)
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


CASES = [(lambda: w.model(0.1), w.loss_fn, None), (Scaled, w.loss_fn, None), (lambda: w.model(0.0), w.loss_fn, 0.5)]


@pytest.mark.parametrize("make, loss, clip", CASES, ids=["dropout", "0-d param", "clipped"])
def test_sharded_step_on_one_rank_equals_the_plain_step_and_its_checkpoint_restores(world_of_one, tmp_path, make, loss, clip):
    from torch.distributed.device_mesh import init_device_mesh

    from fnloop.connectors.fsdp import ShardedReducer, full_tree, shard_state
    from fnloop.connectors.strategy import GradReducer
    from fnloop.options import StepOptions

    plain = fl.TrainState.create(make(), w.tx(), seed=w.SEED)
    sharded = shard_state(plain, init_device_mesh("cpu", (1,)))
    assert type(sharded.params["lin.weight" if make is Scaled else "0.weight"]).__name__ == "DTensor"
    plain_step = fl.train_step(loss).with_options(StepOptions(gradient_clip_val=clip, grad_reduce=GradReducer(0, 1)))  # same seeds
    sharded_step = fl.train_step(loss).with_options(StepOptions(gradient_clip_val=clip, grad_reduce=ShardedReducer(0, 1)))
    for batch in global_batches()[:3]:
        plain, _ = plain_step(plain, batch)
        sharded, _ = sharded_step(sharded, batch)
    check = fl.testing.assert_trees_equal if clip is None else fl.testing.assert_trees_close  # the norm sums shards
    check(full_tree(sharded.params), plain.params)
    check(full_tree(sharded.opt_state), plain.opt_state)
    fl.save(sharded, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["format_version"] == 4
    restored = fl.restore(tmp_path / "ckpt", like=fl.TrainState.create(make(), w.tx(), seed=w.SEED))
    fl.testing.assert_trees_equal(restored.params, full_tree(sharded.params))
    again = fl.restore(tmp_path / "ckpt", like=sharded)
    fl.testing.assert_trees_equal(full_tree(again.opt_state), full_tree(sharded.opt_state))
