"""``StochasticWeightAveraging`` and its pure parts against ``torch.optim.swa_utils``.

Scenario: a ``6-16-3`` MLP with a BatchNorm layer, SGD with momentum, 4 fixed batches per epoch
(a list: no shuffling, the same order in both loops), 6 epochs, SWA from the 3rd epoch. The
torch reference is the hand-written recipe: ``AveragedModel`` updated after each SWA epoch,
``SWALR`` built when SWA starts and stepped after each SWA epoch, ``update_bn`` at the end.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_resume_equivalent, assert_trees_close, assert_trees_equal

import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

EPOCHS, N_BATCHES, LR, SWA_LR = 6, 4, 0.1, 0.05
DATA = sc.make_batches(N_BATCHES, seed=4)


def make_bn_mlp(seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(sc.N_FEATURES, sc.HIDDEN), torch.nn.BatchNorm1d(sc.HIDDEN), torch.nn.Tanh(),
            torch.nn.Linear(sc.HIDDEN, sc.N_CLASSES),
        )


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


STEP = fl.train_step(loss_fn)


def trainer(*callbacks, **flags) -> fl.Trainer:
    flags.setdefault("max_epochs", EPOCHS)
    quiet = dict(enable_progress_bar=False, logger=False, enable_model_summary=False)
    return fl.Trainer(callbacks=list(callbacks), **quiet, **flags)


def make_state(model=None, lr=LR):
    return fl.TrainState.create(model or make_bn_mlp(), flo.swa_params(flo.sgd(lr=lr, momentum=0.9)), seed=3)


class Record(fl.Callback):
    """The LR in force at every batch start, and the average and params at every epoch end."""

    def __init__(self):
        self.lrs, self.averages, self.params = [], [], []

    def on_train_batch_start(self, state, batch, batch_idx):
        self.lrs.append(float(flo.learning_rate(state.opt_state)))

    def on_train_epoch_end(self, state):
        self.averages.append({k: v.clone() for k, v in flo.averaged_params(state.opt_state).items()})
        self.params.append({k: v.clone() for k, v in state.params.items()})


def torch_swa(model, *, swa_start, anneal_epochs=2, strategy="cos", epochs=EPOCHS, scheduler=None):
    """The reference recipe; returns the averaged model and, per epoch, the LRs at each batch and
    the averaged params after the epoch."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sched = scheduler(opt) if scheduler else None
    swa_model = AveragedModel(model)
    swa_sched, lrs, averages = None, [], []
    for epoch in range(epochs):
        if epoch == swa_start:
            swa_sched = SWALR(opt, swa_lr=SWA_LR, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
        for batch in DATA:
            lrs.append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
            if sched is not None and swa_sched is None:
                sched.step()
        if swa_sched is not None:
            swa_model.update_parameters(model)
            swa_sched.step()
        averages.append({k.removeprefix("module."): v.detach().clone() for k, v in swa_model.named_parameters()})
    update_bn(DATA, swa_model)
    return swa_model.module, lrs, averages


# --- (1) the average: AveragedModel.update_parameters ----------------------------------------------


@pytest.mark.parametrize("avg_fn", [None, lambda avg, p, n: 0.75 * avg + 0.25 * p], ids=["equal", "custom"])
def test_swa_average_equals_averaged_model(avg_fn):
    model = make_bn_mlp()
    averaged = AveragedModel(model, avg_fn=avg_fn)
    opt_state = flo.swa_params(flo.adam()).init(dict(model.named_parameters()))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        averaged.update_parameters(model)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt_state = flo.swa_average(opt_state, params, avg_fn=avg_fn)
    expected = {k.removeprefix("module."): v.detach() for k, v in averaged.named_parameters()}
    assert_trees_equal(flo.averaged_params(opt_state), expected)
    assert int(flo.swa_state(opt_state).n_averaged) == int(averaged.n_averaged) == 5


def test_swa_update_is_pure_and_copies_first():
    avg, params = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    first = flo.swa_update(avg, params, 0)
    assert first["w"] is not params["w"] and torch.equal(first["w"], params["w"])
    second = flo.swa_update(first, {"w": torch.full((2,), 3.0)}, torch.tensor(1))
    assert torch.equal(second["w"], torch.full((2,), 2.0)) and torch.equal(first["w"], torch.ones(2))


def test_swa_params_leaves_the_optimizer_unchanged():
    plain, wrapped = fl.TrainState.create(make_bn_mlp(), flo.sgd(lr=LR, momentum=0.9)), make_state()
    for batch in DATA:
        plain, _ = STEP(plain, batch)
        wrapped, _ = STEP(wrapped, batch)
    assert_trees_equal(wrapped.params, plain.params)
    assert int(flo.swa_state(wrapped.opt_state).n_averaged) == 0


def test_swa_params_compiles():
    step = fl.compile(STEP, backend="aot_eager")
    plain, compiled = make_state(), make_state()
    for batch in DATA[:2]:
        plain, _ = STEP(plain, batch)
        compiled, _ = step(compiled, batch)
    assert_trees_close(compiled.params, plain.params, rtol=1e-6, atol=1e-7)


# --- (2) the learning rate: SWALR ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("anneal_epochs", [0, 1, 3])
def test_swalr_values_equal_torch(strategy, anneal_epochs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = SWALR(opt, swa_lr=SWA_LR, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
    lr, ours, theirs = LR, [], []
    for step in range(6):
        lr = flo.swalr(lr, SWA_LR, step, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
        ours.append(lr)
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: nothing moves, but torch wants a step before the scheduler's
        sched.step()
    assert ours == theirs


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_learning_rate_in_the_state_follows_swalr(strategy):
    record = Record()
    cb = fl.StochasticWeightAveraging(SWA_LR, swa_epoch_start=3, annealing_epochs=2, annealing_strategy=strategy)
    trainer(cb, record).fit(make_state(), STEP, DATA)
    _, lrs, _ = torch_swa(make_bn_mlp(), swa_start=2, strategy=strategy)
    assert record.lrs == lrs  # bitwise, at every batch
    assert lrs[-1] == SWA_LR and len(set(lrs[:2 * N_BATCHES])) == 1


def test_scheduled_learning_rate_is_replaced_by_swalr():
    """An optimizer whose LR is a schedule: SWA's LR replaces it from SWA's start, as SWALR
    replaces the scheduler in Lightning (here torch's StepLR stepped per batch before SWA)."""
    record = Record()
    tx = flo.swa_params(flo.sgd(lr=flo.step_lr(LR, step_size=3, gamma=0.5), momentum=0.9))
    cb = fl.StochasticWeightAveraging(SWA_LR, swa_epoch_start=3, annealing_epochs=2)
    state = trainer(cb, record).fit(fl.TrainState.create(make_bn_mlp(), tx, seed=3), STEP, DATA)
    model, lrs, _ = torch_swa(
        make_bn_mlp(), swa_start=2, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    )
    assert record.lrs == lrs
    assert_trees_close(state.params, dict(model.named_parameters()), rtol=1e-6, atol=1e-6)


class RecordAll(fl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_epoch_start(self, state):
        self.lrs.append([float(lr) for lr in flo.learning_rates(state.opt_state)])


def test_one_swa_lr_per_group():
    """``flo.multi_transform`` groups, each with its LR and SWA LR: torch's SWALR over param groups."""
    labels = lambda params: {k: "head" if k.startswith("3.") else "body" for k in params}  # noqa: E731
    tx = flo.swa_params(flo.multi_transform({"body": flo.sgd(lr=0.1), "head": flo.sgd(lr=0.01)}, labels))
    record = RecordAll()
    cb = fl.StochasticWeightAveraging([0.05, 0.005], swa_epoch_start=2, annealing_epochs=2)
    trainer(cb, record, max_epochs=5).fit(fl.TrainState.create(make_bn_mlp(), tx), STEP, DATA)
    opt = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.1}, {"params": [torch.zeros(1)], "lr": 0.01}])
    expected = [[0.1, 0.01]]
    sched = SWALR(opt, swa_lr=[0.05, 0.005], anneal_epochs=2)
    for _ in range(4):
        expected.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert record.lrs == expected


# --- (3) BatchNorm statistics: update_bn -------------------------------------------------------------


def test_update_bn_equals_torch():
    model = make_bn_mlp()
    for batch in DATA:  # running statistics far from the reset values
        model(batch[0])
    state = fl.TrainState.create(model, flo.sgd(lr=LR))
    before = {k: v.clone() for k, v in state.buffers.items()}
    reference = copy.deepcopy(model)
    update_bn(DATA, reference)
    new = fl.update_bn(state, DATA)
    assert_trees_equal(new.buffers, dict(reference.named_buffers()))
    assert_trees_equal(state.buffers, before)  # pure
    assert state.module[1].momentum == 0.1 and state.module[1].training  # the template is untouched


def test_update_bn_with_a_forward_and_without_batch_norm():
    model = make_bn_mlp()
    reference = copy.deepcopy(model)
    update_bn([b[0] for b in DATA], reference)
    dict_batches = [{"x": x, "y": y} for x, y in DATA]
    new = fl.update_bn(fl.TrainState.create(model, flo.sgd(lr=LR)), dict_batches, forward=lambda m, b: m(b["x"]))
    assert_trees_equal(new.buffers, dict(reference.named_buffers()))
    plain = fl.TrainState.create(sc.make_mlp(), flo.sgd(lr=LR))
    assert fl.update_bn(plain, DATA) is plain


# --- (4) end to end: Trainer + callback against the torch recipe ------------------------------------


@pytest.mark.parametrize("strategy,start", [("cos", 3), ("linear", 0.5)])
def test_fit_equals_the_torch_recipe(strategy, start):
    record = Record()
    cb = fl.StochasticWeightAveraging(SWA_LR, swa_epoch_start=start, annealing_epochs=2, annealing_strategy=strategy)
    state = trainer(cb, record).fit(make_state(), STEP, DATA)
    model, lrs, averages = torch_swa(make_bn_mlp(), swa_start=2, strategy=strategy)
    assert record.lrs == lrs
    for epoch in range(2, EPOCHS):  # (1) the average after each SWA epoch, bitwise
        assert_trees_equal(record.averages[epoch], averages[epoch], msg=f"epoch {epoch}")
    assert_trees_equal(state.params, dict(model.named_parameters()))
    assert_trees_equal(state.buffers, {k: v.detach() for k, v in model.named_buffers()})
    assert int(state.buffers["1.num_batches_tracked"]) == N_BATCHES  # the statistics pass, alone
    assert int(flo.swa_state(state.opt_state).n_averaged) == EPOCHS - 2


def test_no_swa_epoch_reached_leaves_the_weights():
    plain = trainer(max_epochs=2).fit(make_state(), STEP, DATA)
    state = trainer(fl.StochasticWeightAveraging(SWA_LR, swa_epoch_start=3), max_epochs=2).fit(make_state(), STEP, DATA)
    assert_trees_equal(state.params, plain.params)
    assert_trees_equal(state.buffers, plain.buffers)


# --- Lightning's own callback -------------------------------------------------------------------------


def test_against_lightning_callback():
    """The same LR at every batch as Lightning's callback. Lightning averages at the start of
    each epoch from swa_start (the weights of the epochs before, not of the last one): its final
    weights are the average of ours after epochs swa_start - 1 .. max_epochs - 2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl = pytest.importorskip("pytorch_lightning")
        from torch.utils.data import DataLoader, TensorDataset

        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = sc.make_mlp()

            def training_step(self, batch, batch_idx):
                return loss_fn(self.net, batch)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

        class PLRecord(pl.Callback):
            def __init__(self):
                self.lrs = []

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        dataset = TensorDataset(torch.cat([x for x, _ in DATA]), torch.cat([y for _, y in DATA]))
        loader = DataLoader(dataset, batch_size=8)  # DATA's batches, in order
        module, pl_record = Module(), PLRecord()
        pl_swa = pl.callbacks.StochasticWeightAveraging(SWA_LR, swa_epoch_start=3, annealing_epochs=2)
        pl.Trainer(
            max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[pl_swa, pl_record],
        ).fit(module, loader)
    record = Record()
    state = fl.TrainState.create(sc.make_mlp(), flo.swa_params(flo.sgd(lr=LR, momentum=0.9)))
    trainer(fl.StochasticWeightAveraging(SWA_LR, swa_epoch_start=3, annealing_epochs=2), record).fit(state, STEP, DATA)
    assert record.lrs == pl_record.lrs
    avg, n = None, 0
    for params in record.params[1:EPOCHS - 1]:
        avg, n = flo.swa_update(avg, params, n), n + 1
    expected = {f"net.{k}": v for k, v in avg.items()}
    assert_trees_close({k: v.detach() for k, v in module.named_parameters()}, expected, rtol=1e-6, atol=1e-6)


# --- (5) interrupt and resume --------------------------------------------------------------------------


def _swa_trainer(*callbacks):
    return trainer(fl.StochasticWeightAveraging(SWA_LR, swa_epoch_start=3, annealing_epochs=2), *callbacks)


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant", "schedule"])
def test_interrupted_fit_resumes_bitwise(scheduled):
    lr = flo.step_lr(LR, step_size=3, gamma=0.5) if scheduled else LR
    final = assert_resume_equivalent(
        _swa_trainer(), lambda: make_state(lr=lr), STEP, DATA,
        interrupt_at=[5, 2 * N_BATCHES, 2 * N_BATCHES + 1, 4 * N_BATCHES - 1, EPOCHS * N_BATCHES - 1],
    )
    assert int(flo.swa_state(final.opt_state).n_averaged) == EPOCHS - 2


def test_resume_from_a_checkpoint_is_bitwise(tmp_path):
    reference = _swa_trainer().fit(make_state(), STEP, DATA)
    ckpt = fl.ModelCheckpoint(str(tmp_path))
    stopped = _swa_trainer(ckpt, InterruptAt(3 * N_BATCHES + 2)).fit(make_state(), STEP, DATA)
    assert stopped.loop.status == "interrupted"
    resumed = _swa_trainer(fl.ModelCheckpoint(str(tmp_path))).fit(make_state(), STEP, DATA, ckpt_path="last")
    for name in ("step", "params", "buffers", "opt_state", "rng"):
        assert_trees_equal(getattr(resumed, name), getattr(reference, name), msg=name)
    key = "StochasticWeightAveraging"
    assert resumed.loop.callbacks[key] == reference.loop.callbacks[key]


class InterruptAt(fl.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, state, metrics):
        if state.loop.total_batch_idx == self.at:
            raise KeyboardInterrupt


# --- (6) errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"swa_lrs": 0.0}, "swa_lrs"),
        ({"swa_lrs": -1.0}, "swa_lrs"),
        ({"swa_lrs": "0.1"}, "swa_lrs"),
        ({"swa_lrs": []}, "swa_lrs"),
        ({"swa_lrs": [0.1, float("nan")]}, "swa_lrs"),
        ({"swa_lrs": 0.1, "swa_epoch_start": 0}, "swa_epoch_start"),
        ({"swa_lrs": 0.1, "swa_epoch_start": 1.5}, "swa_epoch_start"),
        ({"swa_lrs": 0.1, "swa_epoch_start": True}, "swa_epoch_start"),
        ({"swa_lrs": 0.1, "annealing_epochs": -1}, "annealing_epochs"),
        ({"swa_lrs": 0.1, "annealing_epochs": 2.0}, "annealing_epochs"),
        ({"swa_lrs": 0.1, "annealing_strategy": "exp"}, "annealing_strategy"),
        ({"swa_lrs": 0.1, "avg_fn": 3}, "avg_fn"),
        ({"swa_lrs": 0.1, "bn_forward": "mean"}, "bn_forward"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(fl.ConfigError, match=f"{name}="):
        fl.StochasticWeightAveraging(**kwargs)


def test_errors_at_fit_start():
    cb = fl.StochasticWeightAveraging(SWA_LR)
    plain = fl.TrainState.create(make_bn_mlp(), flo.sgd(lr=LR))
    with pytest.raises(fl.ConfigError, match=r"StochasticWeightAveraging: .*flo\.swa_params"):
        trainer(cb).fit(plain, STEP, DATA)
    with pytest.raises(fl.ConfigError, match=r"swa_epoch_start=0\.8.*max_epochs"):
        trainer(cb, max_epochs=None, max_steps=5).fit(make_state(), STEP, DATA)
    with pytest.raises(fl.ConfigError, match=r"swa_lrs=\[0\.1, 0\.2\].*1 learning rate"):
        trainer(fl.StochasticWeightAveraging([0.1, 0.2])).fit(make_state(), STEP, DATA)
    with pytest.raises(fl.ConfigError, match="forward="):
        fl.update_bn(make_state(), DATA, forward=3)
    with pytest.raises(fl.ConfigError, match="2 learning rate"):
        flo.with_learning_rates(make_state().opt_state, [0.1, 0.2])
