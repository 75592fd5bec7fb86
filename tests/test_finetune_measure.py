"""How ``fastlm finetune`` times: Trainers in lockstep (peak memory: tests/test_peak_memory.py).

The lockstep tests drive stand-in trainers that call the two callbacks the real ``Trainer``
calls around each optimizer step (``on_step_begin`` / ``on_step_end``) and record what runs
when, so the order is checked exactly without training anything.
"""
import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

from fastlm.finetune import lockstep  # noqa: E402


class FakeTrainer:
    """``train()`` = per step: fetch a batch, on_step_begin, the step, on_step_end, evaluate."""

    def __init__(self, name: str, log: list, n_steps: int, fail_at: int | None = None, error=ValueError):
        self.name, self.log, self.n, self.fail_at, self.error = name, log, n_steps, fail_at, error
        self.callbacks = []
        self.state = SimpleNamespace(max_steps=n_steps)
        self.args = SimpleNamespace(seed=0)

    def add_callback(self, callback):
        self.callbacks.append(callback)

    def _call(self, event):
        for callback in self.callbacks:
            getattr(callback, event)(self.args, self.state, None)

    def train(self):
        self.log.append((self.name, "begin"))
        for i in range(self.n):
            self.log.append((self.name, "fetch", i))
            self._call("on_step_begin")
            if i == self.fail_at:
                raise self.error(f"{self.name} failed at step {i}")
            self.log.append((self.name, "step", i))
            self._call("on_step_end")
            self.log.append((self.name, "eval", i))
        self.log.append((self.name, "end"))


def _runs(log, n=3, **fail):
    trainers = {"a": FakeTrainer("a", log, n), "b": FakeTrainer("b", log, n, **fail)}
    return {name: lockstep.Stepped(t) for name, t in trainers.items()}


def test_steps_alternate_alone_and_the_rest_runs_between_them():
    log, between = [], []
    times = lockstep.lockstep(_runs(log), on_step=lambda i: between.append((i, len(log))))
    expected = [("a", "begin"), ("a", "fetch", 0), ("b", "begin"), ("b", "fetch", 0),
                ("a", "step", 0), ("b", "step", 0),                       # step 0: a then b
                ("a", "eval", 0), ("a", "fetch", 1), ("b", "eval", 0), ("b", "fetch", 1),
                ("b", "step", 1), ("a", "step", 1),                       # order rotates
                ("a", "eval", 1), ("a", "fetch", 2), ("b", "eval", 1), ("b", "fetch", 2),
                ("a", "step", 2), ("b", "step", 2),
                ("a", "eval", 2), ("a", "end"), ("b", "eval", 2), ("b", "end")]
    assert log == expected
    # on_step(i) comes after both runs have reached their next step's start (or their end)
    assert between == [(0, 10), (1, 16), (2, 22)]
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    assert not [t for t in threading.enumerate() if t.name.startswith("fastlm-lockstep")]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_an_error_in_one_run_stops_both_and_is_raised_in_the_caller(error):
    log = []
    with pytest.raises(error, match="b failed at step 1"):
        lockstep.lockstep(_runs(log, fail_at=1, error=error))
    assert ("a", "end") not in log and ("a", "step", 2) not in log   # a was stopped, not run on
    assert not [t for t in threading.enumerate() if t.name.startswith("fastlm-lockstep")]


def test_runs_planning_different_step_counts_are_refused():
    log = []
    runs = {"a": lockstep.Stepped(FakeTrainer("a", log, 2)), "b": lockstep.Stepped(FakeTrainer("b", log, 3))}
    with pytest.raises(RuntimeError, match="different step counts"):
        lockstep.lockstep(runs)
    assert not [t for t in threading.enumerate() if t.name.startswith("fastlm-lockstep")]
