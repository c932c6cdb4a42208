"""The signal connector, alone and inside ``Trainer.fit``.

Signals are sent to this very process with ``os.kill(os.getpid(), ...)``. Every test runs with a
recording handler installed for each signal it may send (the ``previous`` fixture), so a
handler that fnloop failed to install records the signal instead of ending the test process,
and "the previous handler is restored" means that recording handler is back.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.checkpoint import CheckpointManager, read_meta
from fnloop.connectors.signals import DEFAULT_SIGNALS, StopRequest, stop_signals
from fnloop.testing import assert_trees_equal

SENT = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGUSR2)


class Previous:
    """A handler that records the signals it gets: stands for whatever was installed before fnloop."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, frame: Any) -> None:
        self.received.append(signum)


@pytest.fixture
def previous():
    saved = {s: signal.getsignal(s) for s in SENT}
    handler = Previous()
    for s in SENT:
        signal.signal(s, handler)
    try:
        yield handler
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _installed_by_fnloop(signum: int) -> bool:
    handler = signal.getsignal(signum)
    return isinstance(getattr(handler, "__self__", None), StopRequest)


# --- the connector -------------------------------------------------------------------------------


def test_default_signals_are_sigterm_sigusr1_sigint():
    assert set(DEFAULT_SIGNALS) == {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}


def test_handlers_installed_inside_and_restored_after(previous):
    with stop_signals() as request:
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            assert signal.getsignal(s) == request.handle, signal.Signals(s).name
        assert signal.getsignal(signal.SIGUSR2) is previous
        assert not request.requested and request.signum is None
    for s in SENT:
        assert signal.getsignal(s) is previous, signal.Signals(s).name


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_one_signal_sets_the_request(previous, signum):
    with stop_signals() as request:
        os.kill(os.getpid(), signum)
        assert request.requested and request.signum == signum
    assert previous.received == []


def test_signum_is_the_first_signal_received(previous):
    with stop_signals() as request:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERMs only ask again
        assert request.requested and request.signum == signal.SIGUSR1
    assert previous.received == []


def test_second_sigint_raises_keyboard_interrupt_and_restores_handlers(previous):
    with pytest.raises(KeyboardInterrupt):
        with stop_signals() as request:
            os.kill(os.getpid(), signal.SIGINT)
            assert request.requested and request.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second SIGINT did not raise")
    for s in SENT:
        assert signal.getsignal(s) is previous
    assert previous.received == []


def test_a_sigterm_before_the_sigint_does_not_count_as_the_first_sigint(previous):
    with stop_signals() as request:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # the first SIGINT: a request, no KeyboardInterrupt
        assert request.requested and request.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_handlers_restored_when_the_block_raises(previous):
    with pytest.raises(RuntimeError, match="boom"):
        with stop_signals():
            assert _installed_by_fnloop(signal.SIGTERM)
            raise RuntimeError("boom")
    for s in SENT:
        assert signal.getsignal(s) is previous


def test_outside_the_main_thread_nothing_is_installed(previous):
    seen: dict[str, Any] = {}

    def body() -> None:
        try:
            with stop_signals() as request:
                seen["inside"] = {s: signal.getsignal(s) for s in SENT}
                seen["requested"] = request.requested
        except BaseException as e:  # reported by the assertions below
            seen["error"] = e

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "error" not in seen, seen.get("error")
    assert all(h is previous for h in seen["inside"].values())
    assert seen["requested"] is False
    for s in SENT:
        assert signal.getsignal(s) is previous


def test_a_custom_signal_list(previous):
    with stop_signals([signal.SIGUSR2]) as request:
        assert signal.getsignal(signal.SIGUSR2) == request.handle
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            assert signal.getsignal(s) is previous, signal.Signals(s).name
        os.kill(os.getpid(), signal.SIGTERM)  # not in the list: goes to the previous handler
        assert not request.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        assert request.requested and request.signum == signal.SIGUSR2
    assert previous.received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGUSR2) is previous


def test_nested_blocks_restore_in_order(previous):
    with stop_signals() as outer:
        with stop_signals() as inner:
            os.kill(os.getpid(), signal.SIGTERM)
        assert inner.requested and not outer.requested
        assert signal.getsignal(signal.SIGTERM) == outer.handle
        os.kill(os.getpid(), signal.SIGTERM)
        assert outer.requested
    assert signal.getsignal(signal.SIGTERM) is previous


# --- inside fit ----------------------------------------------------------------------------------

N_BATCHES, EPOCHS = 5, 2


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(N_BATCHES)]


def _state() -> fl.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1)
        )
    return fl.TrainState.create(model, flo.adam(lr=1e-2), seed=3)


def _mse(model: Any, batch: Any) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


STEP = fl.train_step(_mse)


class SendSignal(fl.Callback):
    """Sends ``signum`` to this process ``times`` times after training batch ``at`` (1-based, over
    epochs), and records whether fnloop's handler was the one installed for it. Unless
    ``always``, it sends nothing when fnloop's handler is missing (the test fails on ``installed``)."""

    def __init__(self, at: int, signum: int, times: int = 1, *, always: bool = False) -> None:
        self.at, self.signum, self.times, self.always = at, signum, times, always
        self.installed: list[bool] = []
        self.batches = 0

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> None:
        self.batches += 1
        if state.loop.total_batch_idx == self.at:
            self.installed.append(_installed_by_fnloop(self.signum))
            if self.installed[-1] or self.always:
                for _ in range(self.times):
                    os.kill(os.getpid(), self.signum)


def _trainer(*callbacks: fl.Callback, **flags: Any) -> fl.Trainer:
    return fl.Trainer(max_epochs=EPOCHS, enable_progress_bar=False, callbacks=list(callbacks), **flags)


def _loop_of(url: str) -> dict[str, Any]:
    return {e["path"][5:]: e.get("value") for e in read_meta(url)["leaves"] if e["path"].startswith("loop/")}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_stops_fit_after_the_batch_saves_and_resumes_exactly(previous, tmp_path, signum):
    at = N_BATCHES + 2  # the third batch of the second epoch
    sender = SendSignal(at, signum)
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    state = _trainer(sender).fit(_state(), STEP, _batches(), checkpoint=mgr)
    assert sender.installed == [True]
    assert state.loop.status == "interrupted"
    assert state.loop.total_batch_idx == at and sender.batches == at  # no batch after the signal
    assert (state.loop.epoch, state.loop.batch_idx, state.loop.global_step) == (1, 2, at)
    assert [os.path.basename(u) for u in mgr.all()] == [f"step-{at:08d}"]
    saved = _loop_of(mgr.latest())
    assert (saved["status"], saved["total_batch_idx"], saved["global_step"]) == ("interrupted", at, at)
    for s in SENT:
        assert signal.getsignal(s) is previous, signal.Signals(s).name
    assert previous.received == []

    reference = _trainer().fit(_state(), STEP, _batches())
    resumed = _trainer().fit(_state(), STEP, _batches(), checkpoint=CheckpointManager(str(tmp_path)), ckpt_path="last")
    assert resumed.loop.status == "finished" and resumed.loop.total_batch_idx == EPOCHS * N_BATCHES
    for name in ("step", "params", "buffers", "opt_state", "rng"):
        assert_trees_equal(getattr(resumed, name), getattr(reference, name), msg=name)


def test_a_signal_without_a_checkpoint_manager_still_returns_interrupted(previous):
    state = _trainer(SendSignal(3, signal.SIGTERM)).fit(_state(), STEP, _batches())
    assert state.loop.status == "interrupted" and state.loop.total_batch_idx == 3
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_second_sigint_ends_fit_as_interrupted_with_the_batch_done(previous, tmp_path):
    """fit catches the KeyboardInterrupt of the second SIGINT: it returns the last state reached
    (the batch is done) as interrupted, and the checkpoint callback saves it."""
    at = 4
    sender = SendSignal(at, signal.SIGINT, times=2)
    mgr = CheckpointManager(str(tmp_path))
    state = _trainer(sender).fit(_state(), STEP, _batches(), checkpoint=mgr)
    assert sender.installed == [True]
    assert state.loop.status == "interrupted" and state.loop.total_batch_idx == at
    saved = _loop_of(mgr.latest())
    assert (saved["status"], saved["total_batch_idx"]) == ("interrupted", at)
    for s in SENT:
        assert signal.getsignal(s) is previous
    assert previous.received == []


def test_trainer_stop_signals_chooses_the_signals(previous, tmp_path):
    term = SendSignal(1, signal.SIGTERM, always=True)  # not a stop signal of this fit
    sender = SendSignal(2, signal.SIGUSR2)
    state = _trainer(term, sender, stop_signals=[signal.SIGUSR2]).fit(_state(), STEP, _batches())
    assert term.installed == [False] and sender.installed == [True]
    assert state.loop.status == "interrupted" and state.loop.total_batch_idx == 2
    assert previous.received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGUSR2) is previous


def test_fit_in_a_thread_ignores_signals_and_finishes(previous):
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["state"] = _trainer().fit(_state(), STEP, _batches())
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=60)
    assert "error" not in out, out.get("error")
    assert out["state"].loop.status == "finished"
    assert signal.getsignal(signal.SIGTERM) is previous


class BNNet(torch.nn.Module):
    """``Linear -> BatchNorm1d -> ReLU -> Linear``: buffers that the forward updates."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


def _bn_state() -> fl.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = BNNet()
    return fl.TrainState.create(model, flo.adam(lr=1e-2), seed=3)


@pytest.mark.parametrize("donate", [True, False])
def test_a_second_sigint_inside_the_step_leaves_a_resumable_checkpoint(previous, tmp_path, donate):
    """Ctrl-C twice while the step runs: fit returns interrupted with a consistent state: the one before
    that batch (pure step), or the one after it (a donated step finishes first)."""
    calls = {"n": 0}

    def loss(model: Any, batch: Any) -> torch.Tensor:
        out = model(batch[0])  # BatchNorm has updated its running statistics by now
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt, inside the step
        return torch.nn.functional.mse_loss(out, batch[1])

    mgr = CheckpointManager(str(tmp_path))
    state = _trainer(donate=donate).fit(_bn_state(), fl.train_step(loss), _batches(), checkpoint=mgr)
    done = 4 if donate else 3
    assert state.loop.status == "interrupted" and state.loop.total_batch_idx == done
    assert _loop_of(mgr.latest())["total_batch_idx"] == done
    reference = _trainer().fit(_bn_state(), STEP, _batches())
    resumed = _trainer().fit(
        _bn_state(), STEP, _batches(), checkpoint=CheckpointManager(str(tmp_path)), ckpt_path="last"
    )
    for name in ("step", "params", "buffers", "opt_state", "rng"):
        assert_trees_equal(getattr(resumed, name), getattr(reference, name), msg=name)
