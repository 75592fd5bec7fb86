"""Side-by-side timing that a busy machine cannot skew: contenders run step by step, interleaved.

Timing two training runs one after the other lets load that changes between them inflate or
hide the difference.  Here step ``i`` of every contender runs back to back (the order rotates
each step, so neither always runs first after a pause), and the comparison is made per step:
the ratio of two contenders' times on the SAME step, under the same load, then summarised
by its median and range.  Used by ``fastlm finetune --compare`` and ``bench/bench_training.py``.

    times = interleave({"unpatched": step_a, "fastlm": step_b}, n_steps=20, sync=torch.cuda.synchronize)
    spread = ratio_spread(times["unpatched"], times["fastlm"], skip=1)   # fastlm's speed-up
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence


def interleave(steps: Mapping[str, Callable[[int], object]], n_steps: int, *,
               sync: Callable[[], object] | None = None,
               clock: Callable[[], float] = time.perf_counter,
               on_step: Callable[[int], object] | None = None) -> dict[str, list[float]]:
    """Run ``steps[name](i)`` for ``i in range(n_steps)``, every contender's step ``i`` before any
    step ``i + 1``, the order rotated by one each step; returns seconds per step per contender.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, so asynchronous
    device work is charged to the step that queued it.  ``on_step(i)`` runs after step ``i`` of
    every contender (progress bars), outside the timed region."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [0.0] * n_steps for name in names}
    for i in range(n_steps):
        shift = i % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if sync is not None:
                sync()
            start = clock()
            steps[name](i)
            if sync is not None:
                sync()
            times[name][i] = clock() - start
        if on_step is not None:
            on_step(i)
    return times


def ratio_spread(numerator: Sequence[float], denominator: Sequence[float], *, skip: int = 0) -> dict:
    """Per-step ratios ``numerator[i] / denominator[i]`` (steps from ``skip`` on, e.g. past a
    warm-up step) summarised: ``{"median", "min", "max", "steps"}``; None values without steps.

    With ``numerator`` = the baseline's step times and ``denominator`` = the contender's, the
    median is the contender's speed-up measured under matched load."""
    if len(numerator) != len(denominator):
        raise ValueError(f"step counts differ: {len(numerator)} and {len(denominator)}")
    pairs = list(zip(numerator, denominator))[skip:]
    ratios = sorted(a / b for a, b in pairs if b > 0)
    if not ratios:
        return {"median": None, "min": None, "max": None, "steps": 0}
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1], "steps": len(ratios)}
