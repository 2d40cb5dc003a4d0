"""TrainConfig: every setting of a training run, its checks, its rules on resume, and the noise
schedule and DiffusionLoss it names.

Defaults chosen for short runs (documented here because they differ from the paper's
DiT-XL/2 setup of lr 1e-4, EMA 0.9999, 400K steps):

- ``lr=None`` means 1e-4 (the paper's), except 1e-3 on the 8x8 digits where tiny models
  and a few thousand steps want a larger step;
- ``ema=None`` means min(0.9999, 1 - 10/steps) (an EMA half-life of about 7% of the run),
  always with the usual warm-up min(decay, (1+s)/(10+s)) so early samples are not the
  random initialisation: with 0.9999 a 2,000-step run would sample a mostly untrained model;
- ``bf16=True`` means bf16 autocast of the model on CUDA; on CPU it is ignored (fp32);
- ``model="auto"`` picks unet-tiny for digits, unet-small for other pixel data and DiT-S/2
  for arrays (latents).

On resume the checkpoint's config is the truth (:func:`config_for_resume`): the run-control
settings (FREE_ON_RESUME) may always change, those in OVERRIDABLE only when listed in
``overrides``, any other difference is an error.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TrainConfig", "validate_config", "config_for_resume", "make_schedule", "make_loss",
           "FREE_ON_RESUME", "OVERRIDABLE"]


@dataclass
class TrainConfig:
    # what to train
    model: str = "auto"                 # a name from speed_train.models.model_names(), or auto
    data: str = "digits"                # digits | fashion-mnist | folder | file.npy/.npz
    image_size: int | None = None       # None: the data's own size
    class_cond: bool = True             # use labels when the data has them
    class_dropout: float = 0.1          # label dropout for classifier-free guidance
    flip: bool | None = None            # None: the data's default (see data.py)
    # the diffusion and the loss
    schedule: str = "linear"            # a NoiseSchedule constructor: linear | cosine | scaled_linear
    T: int = 1000
    strategy: str = "speed"
    strategy_params: dict = field(default_factory=dict)
    prediction: str | None = None       # eps | v | x0; None: eps for diffusion, v for flow
    learn_sigma: bool = False
    backend: str = "auto"
    objective: str = "diffusion"        # diffusion | flow (FlowMatchingLoss; samplers euler | heun)
    # optimisation
    steps: int = 800                    # the no-argument digits run: about 3 CPU minutes
    batch_size: int = 128               # global: divided among the ranks
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema: float | None = None
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    bf16: bool = True
    compile: bool = False
    threads: int | None = None          # CPU threads of torch (None: torch's default; 1 under torchrun)
    # output
    out: str | None = None              # None: runs/<name>
    name: str | None = None             # None: <data>-<model>-<strategy>
    log_every: int = 50
    sample_every: int = 0               # 0: one grid at the end only
    ckpt_every: int = 1000              # and always at the end
    sample_n: int = 64
    sampler: str = "ddpm"               # ddpm | ddim
    sample_steps: int = 100
    guidance: float = 1.0
    keep_ckpts: int = 2                 # checkpoints kept (ckpt-<step>.pt; ckpt.pt links the newest)
    resume: bool | str = False          # True: the newest readable checkpoint in <out>; or a checkpoint file
    overrides: list = field(default_factory=list)  # settings allowed to differ from the checkpoint on resume
    skip_nonfinite: int = 0             # skip up to N steps with a non-finite loss / grad norm (0: stop)
    progress: bool = True

    def resolved(self, data_name: str, pixel_space: bool) -> "TrainConfig":
        c = dataclasses.replace(self, strategy_params=dict(self.strategy_params))
        if c.model == "auto":
            c.model = ("unet-tiny" if data_name == "digits" else "unet-small") if pixel_space else "DiT-S/2"
        if c.lr is None:
            c.lr = 1e-3 if data_name == "digits" else 1e-4
        if c.ema is None:
            c.ema = min(0.9999, max(0.0, 1.0 - 10.0 / max(c.steps, 1)))
        if c.prediction is None:  # flow models predict the velocity (docs/flow.md)
            c.prediction = "v" if c.objective == "flow" else "eps"
        if c.objective == "flow" and c.sampler == "ddpm":  # the default sampler; flow's default is euler
            c.sampler = "euler"
        if not c.grad_clip:  # 0 and None both mean off; one spelling in run.json and checkpoints
            c.grad_clip = None
        if c.name is None:
            c.name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{data_name}-{c.model}-{c.strategy}").strip("-")
        if c.out is None:
            c.out = os.path.join("runs", c.name)
        return c


# ---------------------------------------------------------------------------------- validation

def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def validate_config(cfg: TrainConfig) -> None:
    """Every numeric and choice setting checked before any work; ValueError naming the setting
    (in CLI spelling, e.g. --grad-clip) and the bad value."""
    def fail(name, want, got):
        raise ValueError(f"--{name.replace('_', '-')} must be {want}, got {got!r}")

    def integer(name, lo, optional=False):
        v = getattr(cfg, name)
        if optional and v is None:
            return
        if not _is_int(v) or v < lo:
            fail(name, f"an integer >= {lo}" + (" (or unset)" if optional else ""), v)

    def number(name, lo=None, lo_open=False, hi=None, hi_open=False, optional=False):
        v = getattr(cfg, name)
        if optional and v is None:
            return
        ok = _is_num(v) and math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            lo_s = "" if lo is None else ("> " if lo_open else ">= ") + f"{lo:g}"
            hi_s = "" if hi is None else ("< " if hi_open else "<= ") + f"{hi:g}"
            rng = " and ".join(x for x in (lo_s, hi_s) if x)
            fail(name, "a finite number" + (f" {rng}" if rng else "") + (" (or unset)" if optional else ""), v)

    integer("steps", 1)
    integer("batch_size", 1)
    integer("T", 2)
    integer("warmup_steps", 0)
    integer("log_every", 0)
    integer("sample_every", 0)
    integer("ckpt_every", 0)
    integer("sample_n", 0)
    integer("sample_steps", 1)
    integer("keep_ckpts", 1)
    integer("skip_nonfinite", 0)
    integer("seed", 0)
    integer("image_size", 1, optional=True)
    integer("threads", 1, optional=True)
    number("lr", lo=0.0, lo_open=True, optional=True)
    number("weight_decay", lo=0.0)
    number("ema", lo=0.0, hi=1.0, hi_open=True, optional=True)
    number("class_dropout", lo=0.0, hi=1.0, hi_open=True)
    number("guidance", lo=0.0)
    if cfg.grad_clip is not None and not (_is_num(cfg.grad_clip) and math.isfinite(cfg.grad_clip)
                                          and cfg.grad_clip >= 0):
        fail("grad_clip", "a finite number > 0 (0 or unset: no clipping)", cfg.grad_clip)
    for name in ("class_cond", "learn_sigma", "bf16", "compile", "progress"):
        if not isinstance(getattr(cfg, name), bool):
            fail(name, "True or False", getattr(cfg, name))
    if cfg.flip is not None and not isinstance(cfg.flip, bool):
        fail("flip", "True, False or unset", cfg.flip)
    if cfg.prediction is not None and cfg.prediction not in ("eps", "v", "x0"):
        fail("prediction", "one of eps, v, x0", cfg.prediction)
    if cfg.objective not in ("diffusion", "flow"):
        fail("objective", "diffusion or flow", cfg.objective)
    samplers = ("euler", "heun") if cfg.objective == "flow" else ("ddpm", "ddim")
    if cfg.sampler not in samplers and not (cfg.objective == "flow" and cfg.sampler == "ddpm"):
        fail("sampler", " or ".join(samplers) + f" for objective {cfg.objective}", cfg.sampler)
    if not isinstance(cfg.strategy_params, dict):
        raise TypeError(f"strategy_params must be a dict, got {type(cfg.strategy_params).__name__}")
    if not isinstance(cfg.overrides, (list, tuple)) or not all(isinstance(k, str) for k in cfg.overrides):
        raise TypeError(f"overrides must be a list of setting names, got {cfg.overrides!r}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in cfg.overrides:
        if key not in known:
            raise ValueError(f"--override {key}: no such setting; settings: {', '.join(sorted(known))}")
        if key not in OVERRIDABLE and key not in FREE_ON_RESUME:
            raise ValueError(f"--override {key}: the checkpoint's model or state depends on {key}, so it cannot "
                             f"change on resume; overridable: {', '.join(sorted(OVERRIDABLE))}")


# Settings that never change what is trained (may differ on resume without --override) ...
FREE_ON_RESUME = frozenset({"steps", "out", "name", "resume", "progress", "log_every", "sample_every",
                            "ckpt_every", "sample_n", "sampler", "sample_steps", "guidance", "threads",
                            "keep_ckpts", "skip_nonfinite", "overrides"})
# ... and those that change the continuation but not the saved state's meaning (--override KEY).
OVERRIDABLE = frozenset({"lr", "weight_decay", "warmup_steps", "ema", "grad_clip", "backend", "device", "bf16",
                         "compile", "class_dropout"})
# None means "auto / not given" for these: on resume they take the checkpoint's value.
_AUTO_NONE = frozenset({"lr", "ema", "image_size", "flip", "name", "out", "threads"})



def _differs(a, b) -> bool:
    # JSON-ish comparison: a tuple in the config equals the list it was saved as
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) != list(b)
    return a != b


def config_for_resume(raw: TrainConfig, cfg: TrainConfig, saved: dict, explicit, where) -> tuple[TrainConfig, dict]:
    """The checkpoint's config ``saved`` with the run-control settings (and --override ones) of
    ``cfg`` (``raw`` resolved); any other chosen setting that differs is an error listing every
    difference (``where``: the checkpoint, for the message). ``explicit``: the names of the
    settings the caller chose, or None (every setting not left None). Returns (config, the
    overridden settings as {name: {"checkpoint": old, "now": new}})."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    if explicit is None:
        chosen = {k for k in names if not (k in _AUTO_NONE and getattr(raw, k) is None)}
    else:
        chosen = set(explicit) & set(names)
    diffs = {}
    merged = {}
    override_diffs = {}
    for k in names:
        mine = getattr(cfg, k)
        if k not in saved:  # a setting newer than the checkpoint: its default
            merged[k] = mine
            continue
        theirs = saved[k]
        if k in FREE_ON_RESUME:
            merged[k] = mine if k in chosen or k in ("resume", "out", "overrides") else theirs
        elif k in chosen and _differs(theirs, mine):
            if k in cfg.overrides:
                merged[k] = mine
                override_diffs[k] = {"checkpoint": theirs, "now": mine}
            else:
                diffs[k] = (theirs, mine)
                merged[k] = theirs
        else:
            merged[k] = theirs
    if diffs:
        lines = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in
                          ((k, *v) for k, v in sorted(diffs.items())))
        raise ValueError(f"--resume from {where}: settings differ from the checkpoint's ({lines}); drop those "
                         f"flags to continue exactly, or allow a change with --override KEY "
                         f"(overridable: {', '.join(sorted(OVERRIDABLE))})")
    out = TrainConfig(**merged)
    validate_config(out)
    return out, override_diffs


# ---------------------------------------------------------------------------------- what it names

def make_schedule(name: str, T: int):
    from speed_kernels import NoiseSchedule

    ctor = getattr(NoiseSchedule, name, None)
    if name.startswith("_") or not callable(ctor):
        raise ValueError(f"unknown schedule {name!r}; known: linear, cosine, scaled_linear")
    return ctor(T=T)


def make_loss(cfg: TrainConfig, schedule, rank: int = 0, auto_update: bool = True):
    from speed_kernels import DiffusionLoss

    return DiffusionLoss(schedule, strategy=cfg.strategy, strategy_params=cfg.strategy_params or None,
                         prediction=cfg.prediction, learn_sigma=cfg.learn_sigma, backend=cfg.backend,
                         seed=cfg.seed, rank=rank, auto_update=auto_update)
