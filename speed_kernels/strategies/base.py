"""The strategy base: the table contract (:class:`Strategy`), the argument checks every strategy
uses, mirroring, :class:`Combined` and the registry (:func:`register`, :func:`get`, :func:`names`,
:func:`combine`). The strategies themselves live in the family modules beside it."""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Mapping

import numpy as np
import torch

from speed_kernels.process import mirror_pivot
from speed_kernels.schedules import NoiseSchedule
from speed_kernels.tables import sampling_row, weight_row

PREDICTIONS = ("eps", "v", "x0")


# ---------------------------------------------------------------------------- helpers
def _check_schedule(schedule: Any) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _check_prediction(prediction: Any) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def _check_step(step: Any) -> int:
    if isinstance(step, torch.Tensor):
        step = int(step.item())
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def _number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


def _whole(name: str, value: Any, *, lo: int) -> int:
    v = _number(name, value, lo=float(lo))
    if v != int(v):
        raise ValueError(f"{name} must be a whole number >= {lo}, got {value!r}")
    return int(v)


def _table(arr: np.ndarray, what: str, name: str) -> torch.Tensor:
    arr = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"strategy {name!r} produced a non-finite {what} table")
    if np.any(arr < 0):
        raise ValueError(f"strategy {name!r} produced a negative {what} table")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _normalise(p: np.ndarray, name: str) -> np.ndarray:
    s = p.sum()
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"strategy {name!r}: sampling density has no mass on this schedule")
    return p / s


def _eps_to_target(w_eps: np.ndarray, schedule: NoiseSchedule, prediction: str) -> np.ndarray:
    """Express a weight on the ε MSE as the weight of the same objective on the target's MSE."""
    if prediction == "eps":
        return w_eps
    if prediction == "v":
        return w_eps * schedule.numpy("alphas_cumprod")
    return w_eps * schedule.numpy("snr")


def mirror_probs(probs: Any, pivot: int) -> torch.Tensor:
    """Distribution of d = |t - pivot| when t ~ probs (the official SpeeD mirror step). float64 [T]."""
    p = torch.as_tensor(probs, dtype=torch.float64).cpu().numpy()
    T = p.shape[0]
    if isinstance(pivot, bool) or not isinstance(pivot, (int, np.integer)) or not 0 <= pivot <= T - 1:
        raise ValueError(f"pivot must be an integer in [0, {T - 1}], got {pivot!r}")
    d = np.abs(np.arange(T) - int(pivot))
    out = np.bincount(d, weights=p, minlength=T)[:T]
    return torch.from_numpy(out)


def effective_probs(probs: Any, pivot: int, batch_size: int | None = None) -> torch.Tensor:
    """Distribution of the t of a random sample of a batch made as the official SpeeD code makes it:
    the first B//2 + 1 steps drawn from ``probs``, the rest the mirror |t - pivot| of the first ones.
    ``batch_size=None`` gives the large-batch limit (half and half). float64 [T]."""
    p = torch.as_tensor(probs, dtype=torch.float64).cpu()
    m = mirror_probs(p, pivot)
    if batch_size is None:
        frac = 0.5
    else:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        B = int(batch_size)
        drawn = min(B // 2 + 1, B)
        frac = (B - drawn) / B
    return (1.0 - frac) * p + frac * m


# ---------------------------------------------------------------------------- base class
class Strategy:
    """Base class: uniform sampling, weight 1. Subclasses override ``_probs`` / ``_weights_eps``
    (or ``_weights`` for target-specific forms) and set ``name``, ``params``, ``dynamic``, ``mirror``.

    Public API: ``probs(schedule, step=0)``, ``weights(schedule, prediction="eps")``,
    ``update(t, per_sample_losses)``, ``state_dict()``, ``load_state_dict(d)``, ``pivot(schedule)``,
    attributes ``name``, ``params``, ``dynamic``, ``mirror``."""

    name: str = "uniform"
    dynamic: bool = False
    mirror: bool = False
    # True: the strategy keeps its state on the loss's device and writes its own rows there
    # (``write_cdf_`` / ``write_weight_``, in place, no host sync); see strategies.learned
    device_rows: bool = False

    def __init__(self, **params: Any):
        if params:
            raise ValueError(f"strategy {self.name!r} takes no parameters, got {sorted(params)}")
        self.params: Dict[str, Any] = {}

    # tables ------------------------------------------------------------------
    def probs(self, schedule: NoiseSchedule, step: int = 0) -> torch.Tensor:
        """float64 [T], non-negative, sums to 1: the distribution of each drawn t (before mirroring)."""
        _check_schedule(schedule)
        step = _check_step(step)
        p = _normalise(np.asarray(self._probs(schedule, step), dtype=np.float64), self.name)
        return _table(p, "probs", self.name)

    def weights(self, schedule: NoiseSchedule, prediction: str = "eps") -> torch.Tensor:
        """float64 [T], finite and non-negative: the loss weight of a sample at t on the target's MSE."""
        _check_schedule(schedule)
        _check_prediction(prediction)
        return _table(self._weights(schedule, prediction), "weights", self.name)

    def _probs(self, schedule: NoiseSchedule, step: int) -> np.ndarray:
        return np.full(schedule.T, 1.0 / schedule.T)

    def _weights(self, schedule: NoiseSchedule, prediction: str) -> np.ndarray:
        """Weight 1: the plain MSE of whatever target is trained (override for other weightings)."""
        return np.ones(schedule.T)


    def pivot(self, schedule: NoiseSchedule) -> int:
        """The official SpeeD mirror pivot m = argmax(∂_t √(1-ᾱ_t) < 1e-4) + 1 (642 on linear);
        see :func:`speed_kernels.analysis.mirror_pivot`. Only used when ``mirror`` is True."""

        return mirror_pivot(_check_schedule(schedule))

    # learned parts -----------------------------------------------------------
    def parameters(self, device: Any = None) -> list:
        """Learnable tensors to train with the model's optimizer (moved to ``device`` in place, so
        the objects stay the ones the optimizer holds). None for every fixed strategy."""
        return []

    def extra_loss(self, t: torch.Tensor, weighted_mse: torch.Tensor) -> torch.Tensor | None:
        """A per-sample term added to the loss (``weighted_mse``: the detached per-sample MSE term as
        the kernel weighted it). None: nothing is added."""
        return None

    # state -------------------------------------------------------------------
    def update(self, t: Any, per_sample_losses: Any) -> None:
        """Record the per-sample losses of the steps t (no-op unless the strategy is stateful)."""
        return None

    def state_dict(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}

    def load_state_dict(self, d: Mapping) -> None:
        if not isinstance(d, Mapping) or d.get("name") != self.name:
            raise ValueError(
                f"state_dict is for strategy {d.get('name') if isinstance(d, Mapping) else d!r}, not {self.name!r}"
            )
        if "params" in d and dict(d["params"]) != self.params:
            type(self).__init__(self, **dict(d["params"]))  # re-validates; resets any state

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        flags = []
        if self.mirror:
            flags.append("mirror")
        if self.dynamic:
            flags.append("dynamic")
        fl = f" [{', '.join(flags)}]" if flags else ""
        return f"Strategy({self.name!r}{', ' + ps if ps else ''}){fl}"


class _EpsWeighting(Strategy):
    """A weighting defined on the ε MSE (``_weights_eps``), converted to the target's MSE."""

    def _weights(self, schedule: NoiseSchedule, prediction: str) -> np.ndarray:
        return _eps_to_target(self._weights_eps(schedule), schedule, prediction)

    def _weights_eps(self, schedule: NoiseSchedule) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class Uniform(Strategy):
    name = "uniform"



# ---------------------------------------------------------------------------- combine
class Combined(Strategy):
    """Sampling table (and mirror, pivot) of one strategy, weighting table of another."""

    def __init__(self, sampling: Strategy, weighting: Strategy):
        self.sampling, self.weighting = sampling, weighting
        self.name = f"{sampling.name}+{weighting.name}"
        self.params = {"sampling": dict(sampling.params), "weighting": dict(weighting.params)}
        self.mirror = sampling.mirror
        self.dynamic = sampling.dynamic or weighting.dynamic
        self.device_rows = sampling.device_rows or weighting.device_rows

    def probs(self, schedule, step=0):
        return self.sampling.probs(schedule, step)

    def weights(self, schedule, prediction="eps"):
        return self.weighting.weights(schedule, prediction)

    def pivot(self, schedule):
        return self.sampling.pivot(schedule)

    def write_cdf_(self, row: torch.Tensor, schedule: NoiseSchedule, step: int = 0) -> None:
        _write_row_(self.sampling, row, "cdf", schedule, step)

    def write_weight_(self, row: torch.Tensor, schedule: NoiseSchedule, prediction: str = "eps") -> None:
        _write_row_(self.weighting, row, "weight", schedule, prediction)

    def parameters(self, device=None):
        own = self.sampling.parameters(device)
        return own + [p for p in self.weighting.parameters(device) if all(p is not q for q in own)]

    def extra_loss(self, t, weighted_mse):
        return self.weighting.extra_loss(t, weighted_mse)

    def update(self, t, per_sample_losses):
        self.sampling.update(t, per_sample_losses)
        if self.weighting is not self.sampling:
            self.weighting.update(t, per_sample_losses)

    def state_dict(self):
        return {"name": self.name, "sampling": self.sampling.state_dict(), "weighting": self.weighting.state_dict()}

    def load_state_dict(self, d):
        if not isinstance(d, Mapping) or d.get("name") != self.name:
            raise ValueError(f"state_dict is for strategy {d.get('name') if isinstance(d, Mapping) else d!r}, not {self.name!r}")
        self.sampling.load_state_dict(d["sampling"])
        if self.weighting is not self.sampling:
            self.weighting.load_state_dict(d["weighting"])

    def __repr__(self):
        return f"combine({self.sampling!r}, {self.weighting!r})"


def _write_row_(part: Strategy, row: torch.Tensor, which: str, schedule: NoiseSchedule, arg) -> None:
    """One row of a combined strategy's device table from one of its parts: a device-row part
    writes it itself; a fixed part's row was written when the table was built; a host-dynamic part
    (importance, adaptive) has it recomputed on the host and copied in."""
    if part.device_rows:
        (part.write_cdf_ if which == "cdf" else part.write_weight_)(row, schedule, arg)
    elif part.dynamic:
        host = (sampling_row(part.probs(schedule, arg), schedule.T) if which == "cdf"
                else weight_row(part.weights(schedule, arg), schedule.T))
        row.copy_(host, non_blocking=True)


# ---------------------------------------------------------------------------- registry
_REGISTRY: Dict[str, Callable[..., Strategy]] = {}


def register(name: str, factory: Callable[..., Strategy]) -> None:
    """Add a strategy factory under ``name`` (it must accept the parameters as keywords)."""
    if not isinstance(name, str) or not name or "+" in name:
        raise ValueError(f"name must be a non-empty string without '+', got {name!r}")
    _REGISTRY[name] = factory



def factory(name: str) -> Callable[..., Strategy]:
    """The registered factory (usually the class) of ``name``; unknown name → ``ValueError``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list:
    """The registered strategy names."""
    return list(_REGISTRY)


def get(name: str, **params: Any) -> Strategy:
    """A new strategy by name with its parameters. Unknown name or parameter → ``ValueError``
    (listing the known ones). ``"a+b"`` (no parameters) is ``combine(get("a"), get("b"))``."""
    if isinstance(name, Strategy):
        if params:
            raise ValueError("params cannot be given with a Strategy object")
        return name
    if not isinstance(name, str):
        raise ValueError(f"name must be a strategy name (str), got {type(name).__name__}")
    if "+" in name:
        a, _, b = name.partition("+")
        if params:
            raise ValueError(f"a combined name ({name!r}) takes no params; use combine(get(...), get(...))")
        return combine(a, b)
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(names())}")
    factory = _REGISTRY[name]
    sig = inspect.signature(factory)
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        accepted = [p for p in sig.parameters if p != "self"]
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(
                f"strategy {name!r} has no parameter {', '.join(unknown)}; "
                f"its parameters: {', '.join(accepted) if accepted else '(none)'}"
            )
    return factory(**params)


def combine(sampling: Strategy | str, weighting: Strategy | str) -> Strategy:
    """A strategy with the sampling table (and mirror) of ``sampling`` and the weights of ``weighting``
    (each a Strategy or a registered name), e.g. ``combine("speed", "p2")``."""
    s = get(sampling) if isinstance(sampling, str) else sampling
    w = get(weighting) if isinstance(weighting, str) else weighting
    for arg, v in (("sampling", s), ("weighting", w)):
        if not isinstance(v, Strategy):
            raise ValueError(f"{arg} must be a Strategy or a strategy name, got {type(v).__name__}")
    return Combined(s, w)
