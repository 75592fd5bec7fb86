"""Several HF ``Trainer`` runs advanced one optimizer step at a time, in lockstep.

``trainer.train()`` is one blocking call; to time two trainers step by step under the same
load (:func:`fastlm.finetune.interleave.interleave`), each runs in a worker thread that parks
at the start and at the end of every optimizer step (``on_step_begin`` / ``on_step_end``
callbacks) until the main thread lets it go.  Exactly one thread runs at any time, so a
step is timed alone, and whatever the Trainer does between two steps (fetching and collating
the next batch, logging, evaluating) happens in :meth:`Stepped.advance`, outside the timed
region.  The Trainers themselves are untouched: optimizer, scheduler, gradient clipping,
mixed precision, DDP under ``torchrun`` all run as in a plain ``trainer.train()``.

    runs = {name: Stepped(trainer) for name, trainer in trainers.items()}
    times = lockstep(runs)                 # {name: [seconds per step]}

An exception in a run (or Ctrl-C in the main thread) stops every run and is re-raised in
the main thread.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Mapping

from transformers import TrainerCallback

from fastlm.finetune.interleave import interleave


class _Stop(BaseException):
    """Raised inside a worker to end its ``train()`` when the main thread gives up."""


class _Park(TrainerCallback):
    def __init__(self, stepped: "Stepped"):
        self.stepped = stepped

    def on_step_begin(self, args, state, control, **kwargs):
        self.stepped._park("begin")

    def on_step_end(self, args, state, control, **kwargs):
        self.stepped._park("end")


class Stepped:
    """``trainer.train()`` in a thread that runs only between :meth:`step` / :meth:`advance` calls.

    ``between_s``: seconds this run spent outside its timed steps (start-up, batches,
    evaluations, the end of ``train()``)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._go = threading.Semaphore(0)
        self._parked = threading.Semaphore(0)
        self._stop = False
        self.where: str | None = None        # "begin" | "end" | "done"
        self.error: BaseException | None = None
        self.between_s = 0.0
        trainer.add_callback(_Park(self))
        self._thread = threading.Thread(target=self._work, name=f"fastlm-lockstep-{id(self):x}", daemon=True)

    # ------------------------------------------------------------------ worker side
    def _work(self) -> None:
        try:
            self._wait_go()
            self.trainer.train()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            if not isinstance(exc, _Stop):
                self.error = exc
        finally:
            self.where = "done"
            self._parked.release()

    def _park(self, where: str) -> None:
        self.where = where
        self._parked.release()
        self._wait_go()

    def _wait_go(self) -> None:
        self._go.acquire()
        if self._stop:
            raise _Stop

    # ------------------------------------------------------------------ main side
    def _resume(self) -> None:
        """Let the worker run to its next park (or the end); re-raise its error."""
        if self.where == "done":
            return
        self._go.release()
        self._parked.acquire()
        if self.error is not None:
            raise self.error

    def start(self) -> None:
        """Run up to the first step's start.  The global RNGs are seeded first, as ``Trainer``
        seeds them when it is made, so every run draws the same data order however many runs
        were made or started before it."""
        from transformers import set_seed

        begun = time.perf_counter()
        set_seed(self.trainer.args.seed)
        self._thread.start()
        self._resume()
        self.between_s += time.perf_counter() - begun

    def step(self) -> None:
        """One optimizer step (forward, backward, clipping, optimizer and scheduler step)."""
        if self.where != "begin":
            raise RuntimeError(f"training ended before the requested step (at {self.where!r})")
        self._resume()

    def advance(self) -> None:
        """From a step's end to the next step's start (or the end of ``train()``)."""
        begun = time.perf_counter()
        self._resume()
        self.between_s += time.perf_counter() - begun

    def stop(self) -> None:
        """End the worker's ``train()`` (from wherever it is parked) and wait for it."""
        if self._thread.is_alive() and self.where != "done":
            self._stop = True
            self._go.release()
        if self._thread.ident is not None:
            self._thread.join()


def lockstep(runs: Mapping[str, Stepped], *, sync: Callable[[], object] | None = None,
             on_start: Callable[[int], object] | None = None,
             on_step: Callable[[int], object] | None = None) -> dict[str, list[float]]:
    """Run every trainer's optimizer steps interleaved (order rotating per step) and return the
    seconds of each step per run; each ``train()`` is finished (final evaluation included)
    before returning.  The trainers must plan the same number of steps; ``on_start(n_steps)``
    is called once they have, ``on_step(i)`` after step ``i`` of every run (untimed)."""
    def between(i: int) -> None:
        for run in runs.values():
            run.advance()
        if on_step is not None:
            on_step(i)

    try:
        for run in runs.values():
            run.start()
        planned = {name: run.trainer.state.max_steps for name, run in runs.items()}
        n_steps = next(iter(planned.values()), 0)
        if len(set(planned.values())) > 1:
            raise RuntimeError(f"the runs plan different step counts: {planned}")
        if on_start is not None:
            on_start(n_steps)
        times = interleave({name: (lambda i, run=run: run.step()) for name, run in runs.items()}, n_steps,
                           sync=sync, on_step=between)
        for run in runs.values():
            if run.where != "done":
                raise RuntimeError(f"training went on past the {n_steps} steps planned (at {run.where!r})")
        return times
    finally:
        for run in runs.values():
            run.stop()
