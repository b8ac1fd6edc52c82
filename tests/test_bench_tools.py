"""The same-run A/B helper of the benchmarks/tools scripts (``bench_linear.round_robin``):
each round runs every variant with its setting switched on, and the medians come from the
samples of the right variant."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_linear.py"


def _bench_linear():
    spec = importlib.util.spec_from_file_location("bench_linear", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeTimer:
    """Times a call as the setting that is on when it runs (the variants' order shows)."""

    def __init__(self, state):
        self.state = state
        self.calls = []

    def time_us(self, fn):
        fn()
        self.calls.append(self.state["on"])
        return {"a": 10.0, "b": 20.0}[self.state["on"]] + len(self.calls)


def test_round_robin_interleaves_variants_and_keeps_their_samples_apart():
    bl = _bench_linear()
    state = {"on": None}
    timer = _FakeTimer(state)
    variants = {"a": lambda: state.update(on="a"), "b": lambda: state.update(on="b")}
    outs, samples, medians = bl.round_robin(timer, lambda: f"out of {state['on']}", variants, 3)
    assert timer.calls == ["a", "b"] * 3  # round robin, not all of one variant first
    assert outs == {"a": "out of a", "b": "out of b"}
    assert samples == {"a": [11.0, 13.0, 15.0], "b": [22.0, 24.0, 26.0]}
    assert medians == {"a": 13.0, "b": 24.0}
