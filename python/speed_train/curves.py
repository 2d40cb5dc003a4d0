"""Reading a speed-up off two lower-is-better quality curves (steps, values).

``S_u / S_s``: S_u the first step at which the uniform curve reaches its own final value, S_s the
first step at which the other curve reaches that value, both linearly interpolated between
evaluations; "not reached" when it never does. A curve already at or below the target at its
first evaluation gives an upper bound for its step (there is no earlier point to interpolate
from), and the ratio becomes a bound (``>=`` / ``<=``) or unknown (``?``) when both are.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["first_reach_step", "speedup"]


def first_reach_step(steps: Sequence[float], values: Sequence[float], target: float) -> tuple[float | None, bool]:
    """First step where a lower-is-better curve reaches ``target``, linearly interpolated.

    Returns (step, exact): step None when never reached; exact False when the first evaluation
    already reaches it (then the step is an upper bound)."""
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    for i in range(len(s)):
        if not np.isfinite(v[i]) or v[i] > target:
            continue
        if i == 0:
            return float(s[0]), False
        v0, v1 = v[i - 1], v[i]
        if not np.isfinite(v0) or v0 == v1:
            return float(s[i]), True
        frac = (v0 - target) / (v0 - v1)
        return float(s[i - 1] + frac * (s[i] - s[i - 1])), True
    return None, True


def speedup(uniform_curve: tuple[Sequence, Sequence], curve: tuple[Sequence, Sequence]) -> dict:
    """The speed-up of ``curve`` over ``uniform_curve`` (each (steps, values), lower is better).

    Keys: ``target`` (uniform's final value), ``uniform_steps`` / ``steps`` (first steps reaching it),
    ``speedup`` (their ratio; None when the strategy never reaches the target) and ``bound``:
    None when both steps are interpolated, ">=" when only the strategy's is an upper bound (the
    ratio is a lower bound), "<=" when only uniform's is, "?" when both are (no reading)."""
    us, uv = uniform_curve
    target = float(uv[-1])
    s_u, exact_u = first_reach_step(us, uv, target)
    s_s, exact_s = first_reach_step(*curve, target)
    res = {"target": target, "uniform_steps": s_u, "steps": s_s}
    if s_s is None:
        res.update(speedup=None, bound=None)
        return res
    res["speedup"] = s_u / s_s if s_s > 0 else math.inf
    res["bound"] = {(True, True): None, (True, False): ">=", (False, True): "<=", (False, False): "?"}[(exact_u, exact_s)]
    return res
