"""The training loop: one denoiser, one DiffusionLoss (the strategy's sampling and weighting
on the fused loss path), AdamW, EMA, checkpoints that resume the run exactly, torchrun.

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

Exactness of ``resume``: the checkpoint holds the model, EMA, optimizer, every rank's
DiffusionLoss state (Philox counter + strategy state), data order (epoch, index), torch
and numpy RNG states and the partial log accumulators, so N straight steps and N/2 +
resume to N log identical per-step losses and end with identical weights, also after a
SIGKILL at any moment (tests/train/test_checkpoint_faults.py). Resume is exact or refused:
the checkpoint's config is the truth, a differing setting is an error unless listed in
``overrides`` (run-control settings such as ``steps`` or ``log_every`` may always change), and
another world size is refused. Checkpoints: speed_train.checkpoint (atomic, last N kept,
weights-only loadable, an unreadable newest one falls back to the previous).

Per-step work has no host sync on CUDA: the loss and gradient norm are summed on the device and
read (``.item()``) only at side steps (log, checkpoint, sample, eval, end); a device-side flag
records the first step with a non-finite loss or gradient norm, checked at every side step
before anything is written, so a poisoned state is never checkpointed. On CPU (where a
``.item()`` costs nothing: there is no asynchronous queue to drain) and with
``skip_nonfinite > 0`` (which must decide before the optimizer step) it is checked every step.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from .data import DataOrder, load_dataset
from .models import build_model, count_params
from .sampling import sample as _sample, save_grid

__all__ = ["TrainConfig", "Trainer", "NonFiniteError", "load_checkpoint_model", "make_schedule", "validate_config"]

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


class NonFiniteError(RuntimeError):
    """Training stopped at a step whose loss or gradient norm is not finite."""


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


def _learns_from_losses(strategy) -> bool:
    """True when the strategy's update() uses the losses (importance sampling), directly or
    inside a combination: only then must every rank see every rank's losses."""
    parts = [getattr(strategy, "sampling", None), getattr(strategy, "weighting", None)]
    if any(p is not None for p in parts):
        return any(_learns_from_losses(p) for p in parts if p is not None)
    from speed_kernels.strategies import Strategy

    return getattr(strategy, "dynamic", False) and type(strategy).update is not Strategy.update


def _cpu(obj):
    """Checkpoint-friendly copy: tensors to CPU, containers recursively."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _differs(a, b) -> bool:
    # JSON-ish comparison: a tuple in the config equals the list it was saved as
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) != list(b)
    return a != b


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


class Trainer:
    """``Trainer(cfg).run()`` trains and returns a summary dict. Under torchrun (WORLD_SIZE > 1)
    it joins the process group itself (gloo on CPU, NCCL on CUDA).

    ``explicit``: on resume, the names of the settings the caller chose (the CLI passes the
    flags given on its command line); the others take the checkpoint's values. None (the
    Python API): every setting counts as chosen except those left None (auto)."""

    def __init__(self, cfg: TrainConfig, explicit=None):
        validate_config(cfg)  # before any work
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._own_pg = False
        try:
            self._setup(cfg, explicit)
        except BaseException:
            self.close()  # a refused resume or bad setting must not leave a process group behind
            raise

    def _setup(self, cfg: TrainConfig, explicit):
        self.device = _pick_device(cfg.device, self.local_rank)
        # several ranks on one CPU: one thread each, or OpenMP threads fight over the cores
        threads = cfg.threads or (1 if self.world_size > 1 and self.device.type == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        if self.world_size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._own_pg = True
        self.is_main = self.rank == 0

        # data first: it decides the model's channels, size and classes (and the default run folder)
        self.data = load_dataset(cfg.data, cfg.image_size, cfg.flip)
        raw = cfg
        cfg = cfg.resolved(self.data.name, self.data.pixel_space)
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / ckpt_io.LATEST
        self.metrics_path = self.out / "metrics.jsonl"
        self.resumed_from: int | None = None
        self.resume_file: Path | None = None
        self.override_diffs: dict = {}
        state = None
        if cfg.resume:
            state, self.resume_file = self._read_resume_checkpoint(cfg)
            cfg = self._config_for_resume(raw, cfg, state, explicit)
            if (cfg.data, cfg.image_size, cfg.flip) != (raw.data, raw.image_size, raw.flip):
                self.data = load_dataset(cfg.data, cfg.image_size, cfg.flip)  # the checkpoint's data
            if cfg.device != raw.device:  # the checkpoint's device (e.g. cpu on a machine with a GPU)
                self.device = _pick_device(cfg.device, self.local_rank)
            if cfg.threads and cfg.threads != raw.threads:
                torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        if cfg.batch_size % self.world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {self.world_size} ranks")
        C, H, _ = self.data.shape
        self.num_classes = self.data.num_classes if (cfg.class_cond and self.data.labels is not None) else 0

        # the loss before the model: an unknown strategy/backend fails before any work
        self.schedule = make_schedule(cfg.schedule, cfg.T)
        if cfg.objective == "flow":
            from .flow_objective import make_flow_loss

            self.loss_fn = make_flow_loss(cfg, rank=self.rank)
        else:
            self.loss_fn = make_loss(cfg, self.schedule, rank=self.rank, auto_update=True)
        self.gather_losses = (self.world_size > 1 and cfg.objective != "flow"
                              and _learns_from_losses(self.loss_fn.strategy))
        if self.gather_losses:  # each rank updates the strategy from every rank's losses
            self.loss_fn = make_loss(cfg, self.schedule, rank=self.rank, auto_update=False)
        self.backend_info = self._describe_backend()

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.model_args = dict(name=cfg.model, in_channels=C, image_size=H, num_classes=self.num_classes,
                               learn_sigma=cfg.learn_sigma, class_dropout=cfg.class_dropout)
        self.model = build_model(**self.model_args).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        torch.manual_seed(cfg.seed + 7919 * self.rank)  # label dropout differs across ranks
        np.random.seed((cfg.seed + 7919 * self.rank) % 2**32)

        fwd = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            fwd = DDP(fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # compile outside DDP, as PyTorch recommends (its DDP optimizer splits at bucket edges)
        self.fwd = torch.compile(fwd) if cfg.compile else fwd
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": self.params}]
        # a learned weighting's table (uncertainty's u) trains with the model's optimizer, in a group
        # of its own: its lr is the model's times the strategy's lr_scale, no weight decay
        self.strategy_params = self.loss_fn.parameters(self.device) if cfg.objective != "flow" else []
        for p in self.strategy_params:
            scale = float(getattr(p, "lr_scale", 1.0))
            groups.append({"params": [p], "lr": cfg.lr * scale, "weight_decay": 0.0, "lr_scale": scale})
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=self.device.type == "cuda")
        self.order = DataOrder(self.data, cfg.batch_size // self.world_size, seed=cfg.seed, rank=self.rank,
                               world_size=self.world_size, device=self.device)
        self.amp_dtype = torch.bfloat16 if (cfg.bf16 and self.device.type == "cuda") else None
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.step = 0
        self._acc_loss = torch.zeros((), device=self.device)
        self._acc_gn = torch.zeros((), device=self.device)
        self._acc_n = 0
        self.skipped = 0  # steps skipped for a non-finite loss / grad norm (skip_nonfinite)
        # CPU: .item() is free (no asynchronous queue), so check every step and stop before the
        # optimizer applies a NaN; skip_nonfinite must decide before the step too. CUDA: a
        # device-side record of the first bad step, read at side steps (no per-step sync).
        # A strategy that learns from the losses copies them to the host every step anyway (and
        # must never learn from a NaN), so it is checked every step too.
        # (a strategy that learns on the device ignores non-finite losses and needs no host copy)
        self._check_every_step = (self.device.type != "cuda" or cfg.skip_nonfinite > 0
                                  or (_learns_from_losses(self.loss_fn.strategy)
                                      and not getattr(self.loss_fn.strategy, "device_rows", False)))
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.last_good_ckpt: Path | None = None
        self.last_grid: str | None = None
        if state is not None:
            self._apply_checkpoint(state, self.resume_file)
            self.last_good_ckpt = self.resume_file

    # ------------------------------------------------------------------ resume

    def _say(self, msg: str):
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)

    def _read_resume_checkpoint(self, cfg):
        if isinstance(cfg.resume, str):  # one named file: no silent fallback to another
            path = Path(cfg.resume)
            return ckpt_io.load_file(path), path
        state, path = ckpt_io.load_latest(self.out, log=self._say)
        return state, path

    def _config_for_resume(self, raw: TrainConfig, cfg: TrainConfig, state: dict, explicit) -> TrainConfig:
        """The checkpoint's config with the run-control settings (and --override ones) of ``cfg``;
        any other chosen setting that differs is an error listing every difference."""
        where = self.resume_file
        saved_ws = int(state.get("world_size", 1))
        if saved_ws != self.world_size:
            raise ValueError(
                f"checkpoint {where} was written by {saved_ws} rank(s), this run has {self.world_size}: resuming on "
                f"another world size is refused (each rank's t/eps stream and data position belong to its rank); "
                f"resume with {saved_ws} rank(s), or start a new run")
        names = [f.name for f in dataclasses.fields(TrainConfig)]
        saved = state.get("config", {})
        if explicit is None:
            chosen = {k for k in names if not (k in _AUTO_NONE and getattr(raw, k) is None)}
        else:
            chosen = set(explicit) & set(names)
        diffs = {}
        merged = {}
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
                    self.override_diffs[k] = {"checkpoint": theirs, "now": mine}
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
        return out

    # ------------------------------------------------------------------ one step

    def _lr_at(self, step: int) -> float:
        if self.cfg.warmup_steps > 0 and step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        return self.cfg.lr

    def train_step(self, x0, y):
        """One optimisation step; returns (loss, grad_norm, applied) with loss and grad_norm as
        device tensors. ``applied`` is False for a step skipped for a non-finite loss or gradient
        (only with skip_nonfinite > 0). Raises NonFiniteError where the check runs every step."""
        cfg = self.cfg
        lr = self._lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        kw = {"y": y} if self.num_classes else {}
        x_t, t = self.loss_fn.noise(x0)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            pred = self.fwd(x_t, t, **kw)
        try:
            loss = self.loss_fn.loss(pred, x0, t)
        except ValueError:
            # a strategy refusing non-finite losses (importance): the model's output is the cause
            if self._check_every_step and not bool(torch.isfinite(pred).all()):
                nan = torch.full((), float("nan"), device=self.device)
                return self._on_nonfinite(nan, nan)
            raise
        if self.gather_losses:
            # the strategy learns from unweighted losses (what auto_update feeds it too)
            per = self.loss_fn.unweighted_losses(t).float()
            ts = [torch.empty_like(t) for _ in range(self.world_size)]
            ls = [torch.empty_like(per) for _ in range(self.world_size)]
            dist.all_gather(ts, t)
            dist.all_gather(ls, per)
            self.loss_fn.update_strategy(torch.cat(ts), torch.cat(ls))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1:  # the strategy's own parameters are outside DDP: average their gradients
            for p in self.strategy_params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world_size)
        if cfg.grad_clip:
            gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            gn = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        loss, gn = loss.detach(), gn.detach()
        bad = ~(torch.isfinite(loss) & torch.isfinite(gn))
        if self._check_every_step:
            if self.world_size > 1:  # a NaN on one rank: every rank skips or stops together
                flag = bad.to(torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                bad = flag.bool()
            if bool(bad):
                return self._on_nonfinite(loss, gn)
        else:
            self._first_bad = torch.where(bad & (self._first_bad < 0), self.step + 1, self._first_bad)
        self.opt.step()
        self._update_ema()
        return loss, gn, True

    def _on_nonfinite(self, loss, gn):
        """Skip this step (within the skip_nonfinite budget) or stop."""
        if self.skipped >= self.cfg.skip_nonfinite:
            self._stop_nonfinite(self.step + 1, float(loss), float(gn))
        self.skipped += 1
        self.opt.zero_grad(set_to_none=True)
        return loss, gn, False

    def _stop_nonfinite(self, step: int, loss: float | None = None, gn: float | None = None):
        what = "" if loss is None else f" (loss {loss}, grad norm {gn})"
        skipped = f" after skipping {self.skipped} such step(s)" if self.skipped else ""
        good = (f"the last good checkpoint is {self.last_good_ckpt}" if self.last_good_ckpt
                else "no checkpoint was written")
        raise NonFiniteError(f"non-finite loss or gradient norm at step {step}{what}{skipped}: training stopped; "
                             f"{good}" + ("" if self.cfg.skip_nonfinite else " (--skip-nonfinite N skips up to N such "
                                                                            "steps)"))

    def _check_finite(self):
        """The deferred (CUDA) check, at a side step, before anything is logged or saved."""
        if not self._check_every_step:
            first = self._first_bad.clone()
            if self.world_size > 1:
                dist.all_reduce(first, op=dist.ReduceOp.MAX)
            first = int(first)
            if first >= 0:
                self._stop_nonfinite(first)

    @torch.no_grad()
    def _update_ema(self):
        decay = min(self.cfg.ema, (1 + self.step) / (10 + self.step))
        e = list(self.ema.parameters())
        m = list(self.model.parameters())
        torch._foreach_lerp_(e, m, 1.0 - decay)
        for eb, mb in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(mb)

    # ------------------------------------------------------------------ sampling, eval

    def sample(self, n: int | None = None, *, sampler: str | None = None, steps: int | None = None,
               seed: int = 0, y: torch.Tensor | None = None, guidance: float | None = None,
               use_ema: bool = True) -> torch.Tensor:
        """Samples from the EMA model (float32 [n, C, H, W] on the device, in [-1, 1] for pixel
        data). Conditional models get labels 0, 1, 2, ... cycling when y is None."""
        cfg = self.cfg
        n = n or cfg.sample_n
        if y is None and self.num_classes:
            y = torch.arange(n, device=self.device) % self.num_classes
        if cfg.objective == "flow":
            from .sampling import flow_sample

            return flow_sample(self.ema if use_ema else self.model, (n, *self.data.shape),
                               sampler=sampler or cfg.sampler, steps=steps or cfg.sample_steps,
                               shift=self.loss_fn.shift, prediction=cfg.prediction, y=y,
                               guidance=cfg.guidance if guidance is None else guidance, clip=self.data.pixel_space,
                               seed=seed, device=self.device, autocast_dtype=self.amp_dtype)
        return _sample(self.ema if use_ema else self.model, self.schedule, (n, *self.data.shape),
                       sampler=sampler or cfg.sampler, steps=steps or cfg.sample_steps, prediction=cfg.prediction,
                       learn_sigma=cfg.learn_sigma, y=y, guidance=cfg.guidance if guidance is None else guidance,
                       clip=self.data.pixel_space, seed=seed, device=self.device, autocast_dtype=self.amp_dtype)

    def _save_samples(self):
        nrow = self.num_classes if self.num_classes and self.num_classes <= 16 else None
        n = self.cfg.sample_n if nrow is None else -(-self.cfg.sample_n // nrow) * nrow  # whole rows
        x = self.sample(n, seed=self.cfg.seed)
        if str(self.cfg.data).startswith("latents:"):  # show images, not latent channels
            if getattr(self, "_decode", None) is None:
                from .autoencoder import latent_decoder

                self._decode = latent_decoder(self.cfg.data)
            x = self._decode(x).clamp(-1, 1)
        path = save_grid(x, self.out / "samples" / f"step_{self.step:07d}.png", nrow=nrow)
        save_grid(x, self.out / "samples.png", nrow=nrow)
        self.last_grid = str(self.out / "samples.png")
        return path

    # ------------------------------------------------------------------ checkpoints

    def _rank_state(self):
        st = {
            "loss_fn": _cpu(self.loss_fn.state_dict()),
            "data": self.order.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": ckpt_io.numpy_rng_to_state(),
            "acc": [self._acc_loss.cpu(), self._acc_gn.cpu(), self._acc_n],
        }
        if self.device.type == "cuda":
            st["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return st

    def save_checkpoint(self, path: Path | None = None):
        """Collective under torchrun (every rank's RNG/data state is gathered); rank 0 writes.
        Without ``path``: the rotating ckpt-<step>.pt files of the run folder (last keep_ckpts kept,
        ckpt.pt links the newest). A failed write fails every rank with the same message."""
        mine = self._rank_state()
        if self.world_size > 1:
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        error = None
        if self.is_main:
            state = {
                "format": "speed_train/1",
                "step": self.step,
                "config": dataclasses.asdict(self.cfg),
                "model_args": self.model_args,
                "data": {"name": self.data.name, "shape": list(self.data.shape), "pixel_space": self.data.pixel_space},
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(),
                "world_size": self.world_size,
                "skipped_nonfinite": self.skipped,
                "ranks": ranks,
            }
            target = Path(path) if path is not None else self.out / f"ckpt-{self.step:07d}.pt"
            try:
                if path is not None:
                    ckpt_io.save_atomic(state, target)
                else:
                    target = ckpt_io.save_rotating(state, self.out, self.step, keep=self.cfg.keep_ckpts)
            except Exception as exc:
                error = (f"checkpoint save failed at step {self.step} ({target}): {type(exc).__name__}: {exc}; "
                         f"the previous checkpoint ({self.last_good_ckpt or 'none'}) is untouched")
        if self.world_size > 1:  # rank 0 tells every rank; nobody waits forever on a dead writer
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise ckpt_io.CheckpointError(error)
        if path is None:
            self.last_good_ckpt = self.out / f"ckpt-{self.step:07d}.pt"

    def load_checkpoint(self, path: Path):
        """Restore a checkpoint into this trainer (same config and world size assumed; the
        constructor's ``resume`` checks both)."""
        self._apply_checkpoint(ckpt_io.load_file(path), Path(path))

    def _apply_checkpoint(self, st: dict, path: Path):
        if st.get("model_args", {}).get("name") != self.model_args["name"]:
            raise ValueError(f"checkpoint {path} holds model {st.get('model_args', {}).get('name')!r}, "
                             f"not {self.model_args['name']!r}")
        ranks = st["ranks"]
        if len(ranks) != self.world_size:
            raise ValueError(f"checkpoint {path} holds {len(ranks)} rank(s), this run has {self.world_size}")
        self.model.load_state_dict(st["model"])
        self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["optimizer"])
        for g in self.opt.param_groups:  # --override weight_decay; lr is set every step
            g["weight_decay"] = self.cfg.weight_decay
        mine = ranks[self.rank]
        self.loss_fn.load_state_dict(mine["loss_fn"])
        self.order.load_state_dict(mine["data"])
        torch.set_rng_state(mine["torch_rng"])
        ckpt_io.numpy_rng_from_state(mine["numpy_rng"])
        if self.device.type == "cuda" and "cuda_rng" in mine:
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        self._acc_loss = mine["acc"][0].to(self.device)
        self._acc_gn = mine["acc"][1].to(self.device)
        self._acc_n = int(mine["acc"][2])
        self.skipped = int(st.get("skipped_nonfinite", 0))
        self.step = int(st["step"])
        self.resumed_from = self.step

    # ------------------------------------------------------------------ logs

    def _describe_backend(self) -> dict:
        """Which loss backend runs and why, e.g. {"requested": "auto", "resolved": "cpp",
        "reason": "auto on cpu"} or "auto on cpu: no kernel backend (cpp: <why>)"."""
        requested = str(self.cfg.backend)
        try:
            resolved = self.loss_fn.backend(self.device).name
        except Exception as exc:  # an older or foreign loss object
            return {"requested": requested, "resolved": None, "reason": f"unknown ({exc})"}
        if requested == "auto":
            from speed_kernels.backends import auto_choice

            _, reason = auto_choice(self.device)  # names the kernel backends it had to pass over
        else:
            reason = f"requested on {self.device.type}"
        return {"requested": requested, "resolved": resolved, "reason": reason}

    def _backend_name(self) -> str:
        return f"{self.backend_info['requested']} -> {self.backend_info['resolved']}"

    def _write_run_json(self):
        import speed_train
        from speed_kernels.backends import numerics_env

        try:
            import speed_kernels
            sk_version = getattr(speed_kernels, "__version__", None)
        except Exception:  # pragma: no cover
            sk_version = None
        info = {
            "produced_by": "speed-kernels train (speed_train.Trainer)",
            "command": sys.argv,
            "config": dataclasses.asdict(self.cfg),
            "model_args": self.model_args,
            "params": count_params(self.model),
            "data": {"name": self.data.name, "n": len(self.data), "shape": list(self.data.shape),
                     "num_classes": self.num_classes, "flip": self.data.flip},
            "loss": repr(self.loss_fn),
            "backend": self._backend_name(),
            "backend_info": self.backend_info,
            "numerics_env": numerics_env(),
            "device": str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})"
                                          if self.device.type == "cuda" else f" ({os.cpu_count()} CPUs)"),
            "world_size": self.world_size,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                         "speed_kernels": sk_version, "speed_train": getattr(speed_train, "__version__", None)},
            "git_commit": _git_commit(),
            "resumed_from_step": self.resumed_from,
            "resumed_from_file": str(self.resume_file) if self.resume_file else None,
            "overrides": self.override_diffs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_text_atomic(self.out / "run.json", json.dumps(info, indent=2, default=str))

    def _open_metrics(self):
        # on resume keep the log up to the checkpoint's step (later lines belong to a lost future;
        # a line cut by a crash is dropped); rewritten atomically so a crash here loses nothing
        keep = []
        if self.resumed_from is not None and self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= self.resumed_from:
                        keep.append(line)
                except json.JSONDecodeError:
                    pass
        _write_text_atomic(self.metrics_path, "".join(line + "\n" for line in keep))
        return open(self.metrics_path, "a", buffering=1)

    def _read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def plot_loss(self, path: Path | None = None) -> str | None:
        rows = [r for r in self._read_metrics() if r.get("loss") is not None]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss (mean over each log interval)")
        if len(loss) >= 5:
            k = max(2, len(loss) // 20)
            sm = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], sm, lw=1.6, label=f"moving mean of {k}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("weighted loss")
        ax.set_title(f"{self.cfg.name}: {self.cfg.strategy}, {self.cfg.model}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(path or self.out / "loss.png")
        fig.savefig(path)
        plt.close(fig)
        return str(path)

    # ------------------------------------------------------------------ the loop

    def run(self, eval_fn=None, eval_every: int = 0) -> dict:
        """Train to cfg.steps. ``eval_fn(trainer, step) -> dict | None`` runs on rank 0 every
        ``eval_every`` steps and at the end (inside a forked RNG, so it cannot change the run);
        its dict is written into that step's metrics.jsonl line and collected in the summary."""
        cfg = self.cfg
        from tqdm.auto import tqdm

        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resumed_from is None and ckpt_io.checkpoint_files(self.out):
                # a fresh run replaces an earlier run's checkpoints: none may serve as its fallback
                self._say(f"note: removing the checkpoints of an earlier run in {self.out}")
                ckpt_io.remove_all(self.out)
            self._write_run_json()
            mf = self._open_metrics()
        start = self.step
        evals = []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   unit="step", dynamic_ncols=True, desc=cfg.name)
        train_time, last_loss = 0.0, float("nan")
        log_step, interval_t = self.step, 0.0  # interval_t: training time since the last log row
        t_mark = time.perf_counter()
        try:
            while self.step < cfg.steps:
                x0, y = self.order.next_batch()
                loss, gn, applied = self.train_step(x0, y)
                self.step += 1
                if applied:  # a skipped step's NaN stays out of the logged means
                    self._acc_loss += loss
                    self._acc_gn += gn
                    self._acc_n += 1
                bar.update(1)
                s, last = self.step, self.step == cfg.steps
                log_now = cfg.log_every > 0 and (s % cfg.log_every == 0 or last)
                eval_now = eval_fn is not None and ((eval_every > 0 and s % eval_every == 0) or last)
                if not (log_now or eval_now or (cfg.sample_every and s % cfg.sample_every == 0)
                        or (cfg.ckpt_every and s % cfg.ckpt_every == 0) or last):
                    continue
                # ---- a side step: sync here, and keep its time out of the steps/s figure
                self._check_finite()  # never log or checkpoint a poisoned state
                row = None
                if log_now or eval_now:
                    acc = torch.stack([self._acc_loss, self._acc_gn])
                    if self.world_size > 1:
                        dist.all_reduce(acc)
                        acc /= self.world_size
                    n = max(self._acc_n, 1)
                    mean_loss, mean_gn = (acc / n).tolist()
                    if self._acc_n == 0:  # every step of the interval skipped: no mean to report
                        mean_loss = mean_gn = None
                    dt = time.perf_counter() - t_mark
                    train_time += dt
                    t_mark = time.perf_counter()
                    last_loss = mean_loss if mean_loss is not None else last_loss
                    # steps_per_s: this interval's training rate (side work excluded)
                    row = {"step": s, "loss": mean_loss, "grad_norm": mean_gn, "lr": self._lr_at(s - 1),
                           "epoch": self.order.epoch, "steps_per_s": (s - log_step) / max(interval_t + dt, 1e-9)}
                    if cfg.skip_nonfinite:
                        row["nonfinite_skipped"] = self.skipped  # total so far
                    log_step, interval_t = s, 0.0
                    self._acc_loss.zero_()
                    self._acc_gn.zero_()
                    self._acc_n = 0
                    bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
                else:
                    dt = time.perf_counter() - t_mark
                    train_time += dt
                    interval_t += dt
                if eval_now and self.is_main:
                    devs = [self.device] if self.device.type == "cuda" else []
                    with torch.random.fork_rng(devices=devs):
                        res = eval_fn(self, s)
                    if res:
                        row.update(res)
                        evals.append({"step": s, **res})
                if row is not None and self.is_main:
                    mf.write(json.dumps(row) + "\n")
                if self.is_main and ((cfg.sample_every and s % cfg.sample_every == 0) or last) and cfg.sample_n > 0:
                    self._save_samples()
                if (cfg.ckpt_every and s % cfg.ckpt_every == 0) or last:
                    self.save_checkpoint()
                if self.world_size > 1 and (eval_now or last):
                    dist.barrier()  # the others wait while rank 0 evaluates
                t_mark = time.perf_counter()
        finally:
            bar.close()
            if self.is_main:
                mf.close()
        from speed_kernels.backends import numerics_env

        summary = {
            "name": cfg.name, "out": str(self.out), "steps": self.step, "start_step": start,
            "final_loss": last_loss, "train_time_s": train_time,
            "steps_per_s": (self.step - start) / train_time if train_time > 0 else None,
            "params": count_params(self.model), "checkpoint": str(self.ckpt_path),
            "samples": self.last_grid, "evals": evals, "world_size": self.world_size,
            "backend": self.backend_info, "numerics_env": numerics_env(), "nonfinite_skipped": self.skipped,
        }
        if self.is_main:
            summary["loss_curve"] = self.plot_loss()
            with open(self.out / "summary.json", "w") as f:
                json.dump(summary, f, indent=2, default=str)
        return summary

    def close(self):
        if self._own_pg and dist.is_initialized():
            dist.destroy_process_group()
            self._own_pg = False


def load_checkpoint_model(path, device="cpu", use_ema: bool = True):
    """Rebuild the model of a training checkpoint for sampling. ``path``: a checkpoint file or a
    run folder (its newest readable checkpoint). Returns (model, schedule, info) with info = the
    checkpoint's config, model_args, data and step."""
    path = Path(path)
    if path.is_dir():
        st, path = ckpt_io.load_latest(path, log=lambda m: print(m, file=sys.stderr))
    else:
        st = ckpt_io.load_file(path)
    model = build_model(**st["model_args"])
    model.load_state_dict(st["ema" if use_ema else "model"])
    model.to(device).eval()
    cfg = st["config"]
    schedule = make_schedule(cfg["schedule"], cfg["T"])
    info = {"config": cfg, "model_args": st["model_args"], "data": st["data"], "step": st["step"], "path": str(path)}
    return model, schedule, info
