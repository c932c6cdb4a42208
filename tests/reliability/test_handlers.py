"""Interrupts and errors inside handlers: a second Ctrl-C while ``on_train_batch_end`` hooks run
keeps that batch's callback updates, and an error raised inside ``on_exception`` neither replaces
the original error nor skips the other callbacks or the logger's finalize."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.callbacks.base import callback_state, with_callback_state
from scenarios import small_state


def _data(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 4, generator=g), torch.randn(2, 2, generator=g)) for _ in range(n)]


def _loss(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def _fresh():
    state = small_state(flo.sgd(lr=1e-2), step=0)
    return state.replace(loop=state.loop.replace(global_step=0, epoch=0))


class CountBatches(fl.Callback):
    """Counts batches in its callback state; at batch ``at`` it receives two SIGINTs first."""

    def __init__(self, at: int, sigints: int = 2) -> None:
        self.at, self.sigints = at, sigints

    def on_train_batch_end(self, state, metrics):
        if state.loop.total_batch_idx == self.at:
            for _ in range(self.sigints):
                os.kill(os.getpid(), signal.SIGINT)
        seen = callback_state(state, self.state_key, {"n": 0})["n"]
        return with_callback_state(state, self.state_key, {"n": seen + 1})


class Later(fl.Callback):
    """A second hook after the interrupted one: its update must land as well."""

    def on_train_batch_end(self, state, metrics):
        seen = callback_state(state, self.state_key, {"n": 0})["n"]
        return with_callback_state(state, self.state_key, {"n": seen + 1})


@settings(max_examples=12, deadline=None)
@given(at=st.integers(1, 8), sigints=st.integers(1, 3))
def test_sigints_during_batch_end_hooks_keep_the_batch_and_its_updates(at, sigints):
    counter, later = CountBatches(at, sigints), Later()
    trainer = fl.Trainer(max_epochs=1, enable_progress_bar=False, callbacks=[counter, later])
    state = trainer.fit(_fresh(), fl.train_step(_loss), _data())
    done = state.loop.total_batch_idx
    assert callback_state(state, counter.state_key, {"n": 0})["n"] == done
    assert callback_state(state, later.state_key, {"n": 0})["n"] == done
    if at < 8:
        assert state.loop.status == "interrupted" and done == at


class Boom(fl.Callback):
    def on_train_batch_end(self, state, metrics):
        if state.loop.total_batch_idx == 2:
            raise ValueError("original failure")


class BadHandler(fl.Callback):
    def on_exception(self, state, exception):
        raise RuntimeError("the handler failed too")


class Witness(fl.Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_exception(self, state, exception):
        self.seen.append(str(exception))


class Sink:
    """A logger that records how it was finalized."""

    log_dir = None

    def __init__(self) -> None:
        self.finalized: list[str] = []

    def log_metrics(self, metrics, step):
        pass

    def log_hparams(self, *args, **kwargs):
        pass

    def finalize(self, status):
        self.finalized.append(status)


def test_error_inside_on_exception_keeps_the_original_and_runs_every_finalizer():
    witness, sink = Witness(), Sink()
    trainer = fl.Trainer(max_epochs=1, enable_progress_bar=False, callbacks=[Boom(), BadHandler(), witness], logger=sink)
    with pytest.raises(ValueError, match="original failure") as err:
        trainer.fit(_fresh(), fl.train_step(_loss), _data())
    assert witness.seen == ["original failure"]
    assert sink.finalized == ["failed"]
    notes = "\n".join(getattr(err.value, "__notes__", []))
    assert "the handler failed too" in notes or "the handler failed too" in repr(err.value.__context__)


def test_error_inside_on_exception_during_validate_keeps_the_original():
    witness = Witness()

    def failing_eval(model, batch):
        raise ValueError("original failure")

    trainer = fl.Trainer(enable_progress_bar=False, callbacks=[BadHandler(), witness])
    with pytest.raises(ValueError, match="original failure") as err:
        trainer.validate(_fresh(), fl.eval_step(failing_eval), _data(2))
    assert witness.seen == ["original failure"]
    assert any("the handler failed too" in n for n in getattr(err.value, "__notes__", []))
