"""`DiffusionLoss`: the time-step strategy, noise injection and weighted loss around a model.

    loss_fn = DiffusionLoss(NoiseSchedule.linear(), strategy="speed", seed=0)
    x_t, t = loss_fn.noise(x0)          # t from the strategy, eps from the counter-based RNG
    loss = loss_fn.loss(model(x_t, t), x0, t)   # the same eps, regenerated, never stored
    loss.backward()

The object owns its random stream (Philox key from `seed` and `rank`, a call counter kept in a
device tensor) so that a restored `state_dict` continues the same stream and every backend
(torch, triton, cpp, cuda) draws the same t and eps.
"""
from __future__ import annotations

import warnings

import torch

from . import reference
from . import strategies as _strategies
from .backends import KNOWN as KNOWN_BACKENDS
from .backends import select
from .op_schema import DiffusionArgs
from .stream import LossStream, resolve_device
from .tables import ROW_CDF, ROW_WEIGHT, build_tables, sampling_row, target_code, weight_row


class DiffusionLoss(LossStream):
    """Weighted diffusion loss with strategy-driven time-step sampling.

    Args:
        schedule: a `NoiseSchedule`.
        strategy: a name of `speed_kernels.strategies` or a strategy object.
        prediction: what the model predicts: "eps", "v" or "x0".
        learn_sigma: the model outputs 2C channels (prediction, variance values) and the loss
            is DiT's hybrid: weights[t] * MSE + the VLB term with the model mean detached.
        backend: "auto", "triton", "cuda", "cpp" or "torch" (the plain-PyTorch reference).
        seed: 64-bit seed of the random stream (None: drawn from torch's global generator).
        rank: distributed rank, folded into the key so each rank has its own stream.
        auto_update: let `loss()` feed per-sample losses to a dynamic strategy (importance
            sampling). Distributed trainers set False and call `update_strategy` with gathered
            losses.
        check_inputs: validate a given t's range on the host (CPU tensors; on CUDA only for the
            torch reference, which cannot index out of range safely: one host sync there). On
            CUDA the triton and cuda kernels never sync for it: they clamp the table index (no
            out-of-bounds read) and return NaN (x_t, loss, gradient) for a sample whose t is
            outside [0, T). Off for CUDA-graph capture.
        strategy_params: keyword arguments for `strategies.get` when `strategy` is a name.
    """

    def __init__(
        self,
        schedule,
        strategy="speed",
        prediction: str = "eps",
        learn_sigma: bool = False,
        backend: str = "auto",
        seed: int | None = None,
        rank: int = 0,
        auto_update: bool = True,
        check_inputs: bool = True,
        strategy_params: dict | None = None,
    ):
        self.schedule = schedule
        if isinstance(strategy, str):
            strategy = _strategies.get(strategy, **(strategy_params or {}))
        elif strategy_params:
            raise ValueError("strategy_params only go with a strategy given by name")
        self.strategy = strategy
        self.target = target_code(prediction)
        self.prediction = prediction
        self.learn_sigma = bool(learn_sigma)
        self.backend_name = backend
        if backend not in KNOWN_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(KNOWN_BACKENDS)}")
        self.auto_update = auto_update
        self.check_inputs = check_inputs
        self._backend_cache: dict = {}
        self._args: dict = {}  # device -> DiffusionArgs (the backends' named arguments)
        self._parameters_handed_out = False  # a learned weighting warns once if its u reaches no optimizer
        self._init_stream(seed, rank)
        self._host_tables = self._build_host_tables()
        self.pivot = int(self.strategy.pivot(schedule)) if self.strategy.mirror else 0
        self._last_terms: torch.Tensor | None = None
        self.last_t: torch.Tensor | None = None

    # ----------------------------------------------------------------- tables
    def _build_host_tables(self) -> torch.Tensor:
        probs = self.strategy.probs(self.schedule, step=self.step)
        weights = self.strategy.weights(self.schedule, prediction=self.prediction)
        return build_tables(self.schedule, probs, weights, self.prediction, self.learn_sigma)

    @property
    def T(self) -> int:
        return self._host_tables.shape[1]

    @property
    def probs_table(self) -> torch.Tensor:
        """float64 [T]: the strategy's sampling distribution (before any mirroring)."""
        return torch.as_tensor(self.strategy.probs(self.schedule, step=self.step), dtype=torch.float64)

    @property
    def weights_table(self) -> torch.Tensor:
        """float64 [T]: the weight of the MSE term at each t for this prediction target."""
        return torch.as_tensor(self.strategy.weights(self.schedule, prediction=self.prediction), dtype=torch.float64)

    def tables(self, device) -> torch.Tensor:
        """The float32 kernel table on `device` (created once, updated in place); a strategy that
        keeps its state on the device writes its rows into a new table at once."""
        new = resolve_device(device) not in self._tables
        tab = super().tables(device)
        if new and self.strategy.device_rows:
            self._write_device_rows(tab)
        return tab

    def _write_device_rows(self, tab: torch.Tensor) -> None:
        self.strategy.write_cdf_(tab[ROW_CDF], self.schedule, self.step)
        self.strategy.write_weight_(tab[ROW_WEIGHT], self.schedule, self.prediction)

    def parameters(self, device=None) -> list:
        """The strategy's learnable tensors (``uncertainty``'s u), on `device` (default: where the
        loss last ran, else the CPU), for the model's optimizer, in a group of their own at the model's
        lr times each tensor's ``lr_scale`` (what the training engine does): ``AdamW([{"params":
        model.parameters()}, {"params": loss_fn.parameters("cuda"), "lr": lr * 10}], lr=lr)``. Empty
        for every other strategy."""
        if device is None:
            device = self._call.device if self._call is not None else "cpu"
        self._parameters_handed_out = True
        return self.strategy.parameters(resolve_device(device))

    def refresh_tables(self) -> None:
        """Recompute the strategy's rows and copy them in place into every device table
        (dynamic strategies; call outside a captured CUDA graph). A strategy with its state on
        the device writes its rows there itself (no host work, no sync)."""
        if self.strategy.device_rows:
            for tab in self._tables.values():
                self._write_device_rows(tab)
            return
        probs = self.strategy.probs(self.schedule, step=self.step)
        weights = self.strategy.weights(self.schedule, prediction=self.prediction)
        self._host_tables[ROW_CDF] = sampling_row(probs, self.T)
        self._host_tables[ROW_WEIGHT] = weight_row(weights, self.T)
        for tab in self._tables.values():
            tab[ROW_CDF].copy_(self._host_tables[ROW_CDF], non_blocking=True)
            tab[ROW_WEIGHT].copy_(self._host_tables[ROW_WEIGHT], non_blocking=True)

    def op_args(self, device) -> DiffusionArgs:
        """The named arguments every backend's noise()/loss() takes on `device` (cached: the
        table and the counter are the same tensors from call to call)."""
        call = self._counter(device)
        a = self._args.get(call.device)
        if a is None or a.call is not call:
            a = self._args[call.device] = DiffusionArgs(
                self.tables(call.device), self.k0, self.k1, call, self.target, self.learn_sigma,
                bool(self.strategy.mirror), self.pivot,
            )
        return a

    def backend(self, device, dtype: torch.dtype = torch.float32):
        """The backend object that runs on `device` (`auto` keeps float64 on the reference)."""
        key = (self.backend_name, device, dtype)
        b = self._backend_cache.get(key)  # select() per call cost a few us of host time
        if b is None:
            dev = torch.device(device)
            name = "torch" if self.backend_name == "auto" and dtype == torch.float64 else self.backend_name
            b = self._backend_cache[key] = select(name, dev)
        return b

    # ----------------------------------------------------------------- checks
    def _check_x0(self, x0) -> None:
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}")
        if not x0.is_floating_point():
            raise TypeError(f"x0 must be a floating-point tensor, got {x0.dtype}")
        if x0.dim() < 2:
            raise ValueError(f"x0 must have a batch and a channel dimension, got shape {tuple(x0.shape)}")
        if x0.shape[0] == 0 or x0.numel() == 0:
            raise ValueError(f"x0 is empty: shape {tuple(x0.shape)}")

    def _check_t(self, t, x0, backend_name: str | None = None) -> torch.Tensor:
        """The one validation of t for noise() and loss(), whatever the backend: an integer
        tensor (TypeError), shape (B,) on x0's device, values in [0, T) (ValueError naming them).
        The range is checked on the host for CPU tensors; on CUDA only for the torch reference
        (a host sync): the CUDA kernels clamp the index and poison the sample with NaN instead."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be an int64 tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"t must be an integer tensor, got {t.dtype}")
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must have shape ({x0.shape[0]},) to match x0, got {tuple(t.shape)}")
        if t.device != x0.device:
            raise ValueError(f"t is on {t.device} but x0 is on {x0.device}")
        if self.check_inputs and (t.device.type == "cpu" or backend_name in ("torch", "torch-fast")):
            lo, hi = torch.aminmax(t)  # one pass; the bad values are listed only on failure
            if int(lo) < 0 or int(hi) >= self.T:
                bad = t[(t < 0) | (t >= self.T)]
                shown = bad[:8].tolist()
                raise ValueError(
                    f"t must lie in [0, {self.T - 1}], got out-of-range values {shown}"
                    + (f" (and {bad.numel() - 8} more)" if bad.numel() > 8 else "")
                )
        return t.to(torch.int64)

    def _check_pred(self, pred, x0) -> None:
        if not isinstance(pred, torch.Tensor) or not pred.is_floating_point():
            raise TypeError("pred must be a floating-point tensor")
        expect = list(x0.shape)
        if self.learn_sigma:
            expect[1] *= 2
        if list(pred.shape) != expect:
            hint = " (learn_sigma=True: the model must output 2C channels)" if self.learn_sigma else ""
            raise ValueError(f"pred has shape {tuple(pred.shape)}, expected {tuple(expect)}{hint}")
        if pred.device != x0.device:
            raise ValueError(f"pred is on {pred.device} but x0 is on {x0.device}")

    # ----------------------------------------------------------------- the ops
    def noise(self, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """(x_t, t): t drawn from the strategy (or the given t), x_t = sqrt(ab)*x0 + sqrt(1-ab)*eps
        in x0's dtype. With `noise` given, that tensor is the eps (plain-PyTorch path, the RNG
        counter does not move); pass the same tensor to `loss`."""
        self._check_x0(x0)
        t_given = t
        if t is not None:
            t = self._check_t(t, x0, self.backend(x0.device, x0.dtype).name if noise is None else "torch")
        if self.strategy.dynamic:
            self.refresh_tables()
        a = self.op_args(x0.device)
        if noise is not None:
            if noise.shape != x0.shape or noise.device != x0.device:
                raise ValueError(f"noise must match x0 in shape and device, got {tuple(noise.shape)} on {noise.device}")
            if t is None:  # the strategy's draw, without the eps
                from .rng import sample_timesteps

                t = sample_timesteps(x0.shape[0], a.tables[ROW_CDF], a.call, self.k0, self.k1, a.mirror, self.pivot)
                a.call.add_(1)
                self.step += 1
            x_t = reference.mix(x0, t, noise, a.tables)
        else:
            x_t, t = self.backend(x0.device, x0.dtype).noise(x0, t, a)
            self.step += 1
        self._remember_draw(x0, t, t_given)
        return x_t, t

    def loss(self, pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, reduction: str = "mean", noise=None):
        """The weighted loss of the latest `noise` call's eps (regenerated, not stored).

        reduction "mean": scalar (per-sample mean over non-batch dims, times weights[t], then the
        batch mean, as DiT); "none": per-sample losses [B]. Float32 whatever the input dtype."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self._check_x0(x0)
        self._check_pred(pred, x0)
        draw = self._draw
        if not (noise is None and draw is not None and t is draw[1] and x0.shape == draw[0]):
            # the fast path above is the t that noise() returned for this shape: drawn by our op or
            # validated there; anything else is validated (and matched to the draw) here
            t_arg = t
            t = self._check_t(t, x0, "torch" if noise is not None else self.backend(x0.device, pred.dtype).name)
            if noise is None:
                self._check_draw(x0, t_arg)
        reduce_mean = reduction == "mean"
        if noise is not None:
            if noise.shape != x0.shape or noise.device != x0.device:
                raise ValueError(f"noise must match x0 in shape and device, got {tuple(noise.shape)} on {noise.device}")
            out, terms = reference.loss(pred, x0, t, self.tables(x0.device), self.k0, self.k1, None, self.target,
                                        self.learn_sigma, reduce_mean, eps=noise)
        else:
            out, terms = self.backend(x0.device, pred.dtype).loss(pred, x0, t, self.op_args(x0.device), reduce_mean)
        extra = self.strategy.extra_loss(t, terms[0])  # a learned weighting's own term (uncertainty's u)
        if extra is not None:
            if not self._parameters_handed_out:
                # nothing else would tell: an optimizer without u trains the model with u = 0 forever
                self._parameters_handed_out = True  # say it once
                warnings.warn(f"strategy {self.strategy.name!r} learns its weighting (u per t-bucket), but "
                              "loss_fn.parameters(device) was never asked for: add them to your optimizer, as a "
                              "group of their own at the model's lr times their lr_scale (docs/adapters.md), or u "
                              "stays at its initial value and the loss is the unweighted one",
                              UserWarning, stacklevel=2)
            out = out + (extra.mean() if reduce_mean else extra)
        self._last_terms = terms
        self.last_t = t
        if self.strategy.dynamic and self.auto_update:
            self.update_strategy(t, self.unweighted_losses(t, terms))
        return out

    @property
    def last_terms(self) -> dict:
        """Detached per-sample "loss", "mse" (weighted) and "vb" of the latest loss() call
        (formed on access, so a training step that never reads them pays nothing)."""
        terms = self._last_terms
        if terms is None:
            return {}
        return {"loss": terms[0] + terms[1], "mse": terms[0], "vb": terms[1]}

    def unweighted_losses(self, t: torch.Tensor, terms: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample losses without the strategy weight (what loss-aware samplers learn from)."""
        if terms is None:
            terms = self._last_terms
        w = self.tables(t.device)[ROW_WEIGHT][t]
        mse = torch.where(w > 0, terms[0] / w.clamp(min=1e-30), torch.zeros_like(w))
        return mse + terms[1]

    def update_strategy(self, t: torch.Tensor, per_sample_losses: torch.Tensor) -> None:
        """Feed (t, loss) pairs to a dynamic strategy and refresh the device tables in place."""
        self.strategy.update(t, per_sample_losses)
        if self.strategy.dynamic:
            self.refresh_tables()

    def __call__(self, model, x0: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """noise → model(x_t, t, **model_kwargs) → weighted loss (batch mean)."""
        x_t, t = self.noise(x0)
        return self.loss(model(x_t, t, **model_kwargs), x0, t)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**self._stream_state(), "strategy": self.strategy.name, "strategy_state": self.strategy.state_dict(),
                "prediction": self.prediction, "learn_sigma": self.learn_sigma, "T": self.T}

    def load_state_dict(self, state: dict) -> None:
        self._load_stream_state(state, required=("strategy_state",),
                                expect={"T": self.T, "strategy": self.strategy.name})
        self._args.clear()  # the key may have changed
        self.strategy.load_state_dict(state["strategy_state"])
        self.refresh_tables()

    def __repr__(self) -> str:
        try:
            dev = self._call.device if self._call is not None else torch.device("cpu")
            chosen = self.backend(dev).name
        except ValueError:
            chosen = "?"
        return (
            f"DiffusionLoss(strategy={self.strategy!r}, prediction={self.prediction!r}, "
            f"learn_sigma={self.learn_sigma}, backend={self.backend_name!r} -> {chosen!r}, "
            f"seed={self.seed}, rank={self.rank}, T={self.T})"
        )
