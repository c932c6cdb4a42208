"""``Trainer.fit`` over a stacked state: N runs as one, each member equal to its own run.

References: member i of a stacked fit against a fit of ``fl.stack([state_i])`` (the same
vectorized kernels over one member: bitwise), and against a fit of ``state_i`` alone with the
plain step (equal up to the rounding of batched matmuls).

Scenario: a linear regression y = x @ W + b + noise (3 -> 2), 6 training batches of 8 samples
per epoch, validation on 2 batches at each epoch's end, Adam; member 0 starts next to the
solution, the others far from it.
"""

from __future__ import annotations

import math

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

N = 3
N_BATCHES = 6


def _data(seed: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]])
    out = []
    for _ in range(n_batches):
        x = torch.randn(8, 3, generator=g)
        out.append((x, x @ w + 0.5 + 0.05 * torch.randn(8, 2, generator=g)))
    return out


TRAIN, VAL = _data(0, N_BATCHES), _data(1, 2)


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).square().mean()


STEP, EVAL = fl.train_step(_loss), fl.eval_step(_loss)


def _states(n: int = N) -> list[fl.TrainState]:
    states = []
    for i in range(n):
        torch.manual_seed(10 + i)
        model = torch.nn.Linear(3, 2)
        if i == 0:  # next to the solution: its validation loss soon falls below a threshold
            with torch.no_grad():
                model.weight.copy_(torch.tensor([[1.0, 0.5, -1.0], [-2.0, 0.0, 3.0]]) + 0.2)
                model.bias.fill_(0.4)
        states.append(fl.TrainState.create(model, flo.adam(lr=0.05), seed=i))
    return states


def _fit(state, *, callbacks=(), logger=False, max_epochs=4, step=STEP, **fit_kwargs):
    trainer = sc.quiet_trainer(
        max_epochs=max_epochs, seed=0, logger=logger, log_every_n_steps=2, callbacks=list(callbacks),
        enable_checkpointing=bool(fit_kwargs.get("ckpt_path")) or any(isinstance(c, fl.ModelCheckpoint) for c in callbacks) or None,
    )
    return trainer.fit(state, step, TRAIN, val_step=EVAL, val_data=VAL, **fit_kwargs)


def _tensors(state) -> dict[str, torch.Tensor]:
    leaves = {"step": state.step, **{f"params/{k}": v for k, v in state.params.items()}}
    leaves.update({f"opt/{i}": v for i, v in enumerate(fl.tree_leaves(state.opt_state)) if isinstance(v, torch.Tensor)})
    return leaves


def _assert_equal(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _assert_close(a, b, tol: float = 1e-5) -> None:
    for k, v in _tensors(a).items():
        torch.testing.assert_close(v, _tensors(b)[k], rtol=tol, atol=tol, msg=k)


class _Logger:
    """In-memory logger sink: ``rows`` is a list of ``(step, metrics)``."""

    log_dir = None

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def log_hparams(self, params, metrics=None):
        pass

    def finalize(self, status):
        pass

    def values(self, key: str) -> list[tuple[int, float]]:
        return [(step, m[key]) for step, m in self.rows if key in m]


# --- steps -------------------------------------------------------------------------------------


def test_a_plain_step_is_vmapped_over_the_members():
    states = _states()
    auto = _fit(fl.stack(states), max_epochs=1)
    explicit = _fit(fl.stack(states), max_epochs=1, step=fl.vmap(STEP))
    _assert_equal(auto, explicit)
    assert auto.step.tolist() == [N_BATCHES] * N


def test_a_step_that_cannot_run_over_members_is_refused():
    stacked = fl.stack(_states())
    with pytest.raises(ConfigError, match=r"stacked \(3 members\).*fl\.vmap\(step\)"):
        sc.quiet_trainer(max_epochs=1).fit(stacked, lambda state, batch: (state, {}), TRAIN)
    with pytest.raises(ConfigError, match=r"Trainer\.fit: the step is vmapped.*not stacked.*fl\.stack\(states\)"):
        sc.quiet_trainer(max_epochs=1).fit(_states(1)[0], fl.vmap(STEP), TRAIN)
    with pytest.raises(ConfigError, match=r"Trainer\.validate.*fl\.vmap"):
        sc.quiet_trainer().validate(stacked, lambda state, batch: {}, VAL)


def test_trainer_flags_apply_to_every_member():
    """Accumulation over a partial window at each epoch's end (6 batches, windows of 4) and clipping."""

    def fit(state):
        trainer = sc.quiet_trainer(max_epochs=2, seed=0, accumulate_grad_batches=4, gradient_clip_val=0.5)
        return trainer.fit(state, STEP, TRAIN, val_step=EVAL, val_data=VAL)

    stacked = fit(fl.stack(_states()))
    assert stacked.loop.global_step == 4 and stacked.step.tolist() == [12] * N
    for i in range(N):
        _assert_equal(fl.unstack(stacked)[i], fl.unstack(fit(fl.stack([_states()[i]])))[0])
        _assert_close(fl.unstack(stacked)[i], fit(_states()[i]))


def test_a_compiled_stacked_fit_matches_the_eager_one():
    compiled = _fit(fl.stack(_states()), step=fl.compile(fl.vmap(STEP)), callbacks=[_stopper()], max_epochs=3)
    eager = _fit(fl.stack(_states()), callbacks=[_stopper()], max_epochs=3)
    assert compiled.step.tolist() == eager.step.tolist() == [N_BATCHES, 3 * N_BATCHES, 3 * N_BATCHES]
    _assert_close(compiled, eager)


# --- logging -----------------------------------------------------------------------------------


def test_each_member_is_logged_as_its_own_fit_logs_it():
    states = _states()
    logger = _Logger()
    stacked = _fit(fl.stack(states), logger=logger)
    keys = {k for _, m in logger.rows for k in m}
    for name in ("train/loss", "train/loss_epoch", "val/loss"):
        assert {f"{name}/member_{i}" for i in range(N)} <= keys, name
    assert not any(k.endswith(f"member_{N}") for k in keys)
    for step, m in logger.rows:  # the plain name is the mean over members
        for name in ("train/loss", "val/loss"):
            if name in m:
                assert m[name] == pytest.approx(sum(m[f"{name}/member_{i}"] for i in range(N)) / N, rel=1e-12)
    for i, state in enumerate(states):
        alone, one = _Logger(), _Logger()
        _assert_close(fl.unstack(stacked)[i], _fit(_states()[i], logger=alone))  # a fit donates its state: fresh ones
        _assert_equal(fl.unstack(stacked)[i], fl.unstack(_fit(fl.stack([state]), logger=one))[0])
        for name in ("train/loss", "train/loss_epoch", "val/loss"):
            got = logger.values(f"{name}/member_{i}")
            assert [s for s, _ in got] == [s for s, _ in alone.values(name)] != []
            assert [v for _, v in got] == pytest.approx([v for _, v in alone.values(name)], rel=1e-5)
            assert [v for _, v in got] == pytest.approx([v for _, v in one.values(f"{name}/member_0")], rel=1e-12)


def test_validate_and_test_report_every_member():
    states = _states()
    stacked = fl.stack(states)
    for run in (sc.quiet_trainer().validate, sc.quiet_trainer().test):
        metrics = run(stacked, EVAL, VAL)
        prefix = "val" if "val/loss" in metrics else "test"
        for i, state in enumerate(states):
            alone = run(state, EVAL, VAL)  # evaluation does not donate
            assert metrics[f"{prefix}/loss/member_{i}"] == pytest.approx(alone[f"{prefix}/loss"], rel=1e-6)
        assert metrics[f"{prefix}/loss"] == pytest.approx(sum(metrics[f"{prefix}/loss/member_{i}"] for i in range(N)) / N)


def test_predict_runs_every_member_and_the_lr_monitor_logs_each():
    states = _states()
    predict = fl.predict_step(lambda model, batch: model(batch[0]))
    outputs = sc.quiet_trainer().predict(fl.stack(states), predict, VAL)
    assert outputs[0].shape == (N, 8, 2)
    for i, state in enumerate(states):
        torch.testing.assert_close(outputs[1][i], sc.quiet_trainer().predict(state, predict, VAL)[1])
    logger = _Logger()
    sc.quiet_trainer(max_epochs=1, seed=0, logger=logger, callbacks=[fl.LearningRateMonitor()]).fit(fl.stack(states), STEP, TRAIN)
    assert [logger.values(f"lr/member_{i}")[0][1] for i in range(N)] == pytest.approx([0.05] * N)


def test_the_progress_bar_shows_the_mean_over_members():
    shown = {}

    class Bar:
        def set_postfix(self, values, refresh):
            shown.update(values)

    bar = fl.ProgressBar()
    bar._bar = Bar()
    bar.on_log({"train/loss": 1.5, "train/loss/member_0": 1.0, "train/loss/member_1": 2.0}, 3)
    assert shown == {"train/loss": "1.5"}


# --- early stopping ----------------------------------------------------------------------------


def _stopper():
    return fl.EarlyStopping("val/loss", stopping_threshold=0.05, patience=100)


def test_a_member_that_stops_early_is_frozen_while_the_others_go_on():
    states = _states()
    logger = _Logger()
    stacked = _fit(fl.stack(states), callbacks=[_stopper()], logger=logger, max_epochs=6)
    assert stacked.loop.epoch == 6 and not stacked.loop.stop  # the others went on to max_epochs
    members = fl.unstack(stacked)
    one = [_fit(fl.stack([s]), callbacks=[_stopper()], max_epochs=6) for s in states]
    assert one[0].loop.stop and one[0].loop.epoch < 6  # member 0 alone stops early...
    assert int(members[0].step) == int(one[0].step[0]) < 6 * N_BATCHES  # ...at the same step
    assert [int(m.step) for m in members[1:]] == [6 * N_BATCHES] * (N - 1)
    for i in range(N):  # every member, frozen or not, bitwise its own run
        _assert_equal(members[i], fl.unstack(one[i])[0])
        key = "EarlyStopping[val/loss]"
        assert fl.member_state(stacked, i).loop.callbacks[key] == fl.member_state(one[i], 0).loop.callbacks[key]
    alone = _fit(_states()[0], callbacks=[_stopper()], max_epochs=6)
    _assert_close(members[0], alone)
    record = fl.member_state(stacked, 0).loop.callbacks["EarlyStopping[val/loss]"]
    assert record["stopped_epoch"] == alone.loop.callbacks["EarlyStopping[val/loss]"]["stopped_epoch"]
    assert stacked.loop.callbacks["members"]["active"] == [False] + [True] * (N - 1)
    # a frozen member's values no longer change: its validation loss stays where it stopped
    after = [v for s, v in logger.values("val/loss/member_0") if s > int(members[0].step)]
    assert len(after) >= 1 and len(set(after)) == 1


def test_the_fit_ends_when_every_member_has_stopped():
    states = _states()
    stopper = fl.EarlyStopping("val/loss", patience=1, min_delta=0.05)
    stacked = _fit(fl.stack(states), callbacks=[stopper], max_epochs=40)
    stopped = [fl.member_state(stacked, i).loop.callbacks["EarlyStopping[val/loss]"]["stopped_epoch"] for i in range(N)]
    assert len(set(stopped)) == N  # each at its own epoch
    assert stacked.loop.stop and min(stopped) >= 0
    assert stacked.loop.epoch == max(stopped) + 1 < 40
    for i, state in enumerate(states):
        _assert_equal(fl.unstack(stacked)[i], fl.unstack(_fit(fl.stack([state]), callbacks=[stopper], max_epochs=40))[0])


# --- checkpoints ---------------------------------------------------------------------------------


def test_each_member_keeps_its_own_best_checkpoints(tmp_path):
    states = _states()
    logger = _Logger()
    checkpoint = fl.ModelCheckpoint(str(tmp_path / "ckpt"), keep_best=2, monitor="val/loss")
    stacked = _fit(fl.stack(states), callbacks=[checkpoint], logger=logger, max_epochs=5)
    record = stacked.loop.callbacks["ModelCheckpoint/members"]["members"]
    for i, state in enumerate(states):
        scores = logger.values(f"val/loss/member_{i}")
        best = sorted(scores, key=lambda sv: sv[1])[:2]
        assert [[v, s] for s, v in best] == record[i]["best_k"]
        folder = fl.CheckpointManager(str(tmp_path / "ckpt" / f"member_{i}"), monitor="val/loss")
        assert sorted(int(u.rsplit("-", 1)[1]) for u in folder.all()) == sorted(s for s, _ in best)
        like = fl.TrainState.create(torch.nn.Linear(3, 2), flo.adam(lr=0.05))
        restored = checkpoint.restore_member(i, like=like)
        assert restored.loop.global_step == best[0][0]
        assert fl.restore(folder.best(), like=like).loop.global_step == best[0][0]
        # the member's best is its own run's best: bitwise the state of a one-member fit at that step
        one = _fit(fl.stack([state]), max_epochs=math.ceil(best[0][0] / N_BATCHES))
        _assert_equal(restored, fl.unstack(one)[0])
        assert restored.step.ndim == 0 and "members" not in restored.loop.callbacks


@pytest.mark.parametrize("at", [4, 3 * N_BATCHES + 2])  # before member 0 stops, after it stopped
def test_an_interrupted_stacked_fit_resumes_bitwise(tmp_path, at):
    states = _states()

    def callbacks(folder, *extra):
        return [_stopper(), fl.ModelCheckpoint(str(tmp_path / folder), keep_best=2, keep_last=1, monitor="val/loss"), *extra]

    whole = _fit(fl.stack(states), callbacks=callbacks("whole"), max_epochs=6)
    interrupted = _fit(fl.stack(states), callbacks=callbacks("cut", sc.InterruptAt(at)), max_epochs=6)
    assert interrupted.loop.status == "interrupted" and interrupted.loop.total_batch_idx == at + 1
    resumed = _fit(fl.stack(states), callbacks=callbacks("cut"), max_epochs=6, ckpt_path="last")
    _assert_equal(resumed, whole)
    assert dict(resumed.loop.callbacks) == dict(whole.loop.callbacks)
    for i in range(N):
        names = lambda folder: sorted(u.rsplit("/", 1)[1] for u in fl.CheckpointManager(str(tmp_path / folder / f"member_{i}")).all())  # noqa: E731
        assert names("cut") == names("whole")
