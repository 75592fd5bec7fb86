"""fastlm.finetune.interleave: contenders' steps alternate, per-step ratios are summarised."""
import pytest

from fastlm.finetune.interleave import interleave, ratio_spread


def test_steps_interleave_with_rotating_order_and_are_timed_each():
    calls, now = [], [0.0]
    cost = {"a": 1.0, "b": 3.0, "c": 2.0}

    def step(name):
        def run(i):
            calls.append((name, i))
            now[0] += cost[name] * (i + 1)
        return run

    times = interleave({n: step(n) for n in "abc"}, 4, clock=lambda: now[0])
    # every contender's step i runs before any step i + 1, first runner rotating
    assert [c for c, _ in calls] == list("abc" "bca" "cab" "abc")
    assert [i for _, i in calls] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert times == {n: [cost[n] * (i + 1) for i in range(4)] for n in "abc"}


def test_sync_brackets_every_timed_step():
    events = []
    interleave({"x": lambda i: events.append("step")}, 2, sync=lambda: events.append("sync"),
               on_step=lambda i: events.append(f"done{i}"))
    assert events == ["sync", "step", "sync", "done0", "sync", "step", "sync", "done1"]


def test_ratio_spread_is_per_step_and_skips_warmup():
    base = [10.0, 4.0, 6.0, 9.0]
    new = [1.0, 2.0, 2.0, 3.0]
    assert ratio_spread(base, new, skip=1) == {"median": 3.0, "min": 2.0, "max": 3.0, "steps": 3}
    assert ratio_spread(base, new)["max"] == 10.0
    assert ratio_spread([], [])["median"] is None
    with pytest.raises(ValueError, match="step counts differ"):
        ratio_spread([1.0], [1.0, 2.0])
