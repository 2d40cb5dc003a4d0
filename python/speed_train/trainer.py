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
resume to N log identical per-step losses (tests/train/test_trainer.py checks it).

Per-step work has no host sync: the loss and gradient norm are summed on the device and
read (``.item()``) only at log steps.
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

from .data import DataOrder, load_dataset
from .models import build_model, count_params
from .sampling import sample as _sample, save_grid

__all__ = ["TrainConfig", "Trainer", "load_checkpoint_model", "make_schedule"]

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
    prediction: str = "eps"             # eps | v | x0
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
    resume: bool | str = False          # True: <out>/ckpt.pt; or a checkpoint path
    progress: bool = True

    def resolved(self, data_name: str, pixel_space: bool) -> "TrainConfig":
        c = dataclasses.replace(self, strategy_params=dict(self.strategy_params))
        if c.model == "auto":
            c.model = ("unet-tiny" if data_name == "digits" else "unet-small") if pixel_space else "DiT-S/2"
        if c.lr is None:
            c.lr = 1e-3 if data_name == "digits" else 1e-4
        if c.ema is None:
            c.ema = min(0.9999, max(0.0, 1.0 - 10.0 / max(c.steps, 1)))
        if c.name is None:
            c.name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{data_name}-{c.model}-{c.strategy}").strip("-")
        if c.out is None:
            c.out = os.path.join("runs", c.name)
        return c


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
    it joins the process group itself (gloo on CPU, NCCL on CUDA)."""

    def __init__(self, cfg: TrainConfig):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._own_pg = False
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

        # data first: it decides the model's channels, size and classes
        self.data = load_dataset(cfg.data, cfg.image_size, cfg.flip)
        self.cfg = cfg = cfg.resolved(self.data.name, self.data.pixel_space)
        if cfg.batch_size % self.world_size:
            raise ValueError(f"batch size {cfg.batch_size} is not divisible by {self.world_size} ranks")
        if cfg.objective == "flow" and cfg.sampler == "ddpm":  # the default sampler: flow's is euler
            self.cfg = cfg = dataclasses.replace(cfg, sampler="euler")
        samplers = ("euler", "heun") if cfg.objective == "flow" else ("ddpm", "ddim")
        if cfg.objective not in ("diffusion", "flow"):
            raise ValueError(f"objective must be diffusion or flow, got {cfg.objective!r}")
        if cfg.sampler not in samplers:
            raise ValueError(f"sampler must be one of {samplers} for objective {cfg.objective}, got {cfg.sampler!r}")
        self.out = Path(cfg.out)
        C, H, _ = self.data.shape
        self.num_classes = self.data.num_classes if (cfg.class_cond and self.data.labels is not None) else 0

        # the loss before the model: an unknown strategy/backend fails before any work
        self.schedule = make_schedule(cfg.schedule, cfg.T)
        if cfg.objective == "flow":
            from .flow_objective import make_flow_loss

            self.loss_fn = make_flow_loss(cfg, rank=self.rank)
        else:
            self.loss_fn = make_loss(cfg, self.schedule, rank=self.rank, auto_update=True)
        self.gather_losses = self.world_size > 1 and _learns_from_losses(self.loss_fn.strategy)
        if self.gather_losses:  # each rank updates the strategy from every rank's losses
            self.loss_fn = make_loss(cfg, self.schedule, rank=self.rank, auto_update=False)

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
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
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
        self.ckpt_path = self.out / "ckpt.pt"
        self.metrics_path = self.out / "metrics.jsonl"
        self.last_grid: str | None = None
        self.resumed_from: int | None = None
        if cfg.resume:
            path = Path(cfg.resume) if isinstance(cfg.resume, str) else self.ckpt_path
            if not path.exists():
                raise FileNotFoundError(f"--resume: no checkpoint at {path}")
            self.load_checkpoint(path)

    # ------------------------------------------------------------------ one step

    def _lr_at(self, step: int) -> float:
        if self.cfg.warmup_steps > 0 and step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        return self.cfg.lr

    def train_step(self, x0, y):
        """One optimisation step; returns (loss, grad_norm) as device tensors (no sync)."""
        cfg = self.cfg
        lr = self._lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        kw = {"y": y} if self.num_classes else {}
        x_t, t = self.loss_fn.noise(x0)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            pred = self.fwd(x_t, t, **kw)
        loss = self.loss_fn.loss(pred, x0, t)
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
        if cfg.grad_clip:
            gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            gn = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        self.opt.step()
        self._update_ema()
        return loss.detach(), gn.detach()

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
            "numpy_rng": np.random.get_state(),
            "acc": (self._acc_loss.cpu(), self._acc_gn.cpu(), self._acc_n),
        }
        if self.device.type == "cuda":
            st["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return st

    def save_checkpoint(self, path: Path | None = None):
        """Collective under torchrun (every rank's RNG/data state is gathered); rank 0 writes."""
        path = Path(path or self.ckpt_path)
        mine = self._rank_state()
        if self.world_size > 1:
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
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
                "ranks": ranks,
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint whole

    def load_checkpoint(self, path: Path):
        st = torch.load(path, map_location="cpu", weights_only=False)
        if st.get("model_args", {}).get("name") != self.model_args["name"]:
            raise ValueError(f"checkpoint {path} holds model {st.get('model_args', {}).get('name')!r}, "
                             f"not {self.model_args['name']!r}")
        self.model.load_state_dict(st["model"])
        self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["optimizer"])
        ranks = st["ranks"]
        if len(ranks) != self.world_size and self.is_main:
            print(f"warning: checkpoint from {len(ranks)} ranks resumed on {self.world_size}: "
                  f"the continuation is valid but not the same stream", file=sys.stderr)
        mine = ranks[self.rank] if self.rank < len(ranks) else ranks[0]
        self.loss_fn.load_state_dict(mine["loss_fn"])
        self.order.load_state_dict(mine["data"])
        torch.set_rng_state(mine["torch_rng"])
        np.random.set_state(mine["numpy_rng"])
        if self.device.type == "cuda" and "cuda_rng" in mine:
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        self._acc_loss = mine["acc"][0].to(self.device)
        self._acc_gn = mine["acc"][1].to(self.device)
        self._acc_n = mine["acc"][2]
        self.step = int(st["step"])
        self.resumed_from = self.step

    # ------------------------------------------------------------------ logs

    def _backend_name(self) -> str:
        try:
            return f"{self.cfg.backend} -> {self.loss_fn.backend(self.device).name}"
        except Exception:  # an older or foreign loss object
            return str(self.cfg.backend)

    def _write_run_json(self):
        import speed_train

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
            "device": str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})"
                                          if self.device.type == "cuda" else f" ({os.cpu_count()} CPUs)"),
            "world_size": self.world_size,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                         "speed_kernels": sk_version, "speed_train": getattr(speed_train, "__version__", None)},
            "git_commit": _git_commit(),
            "resumed_from_step": self.resumed_from,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with open(self.out / "run.json", "w") as f:
            json.dump(info, f, indent=2, default=str)

    def _open_metrics(self):
        # on resume keep the log up to the checkpoint's step (later lines belong to a lost future)
        keep = []
        if self.resumed_from is not None and self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= self.resumed_from:
                        keep.append(line)
                except json.JSONDecodeError:
                    pass
        with open(self.metrics_path, "w") as f:
            f.write("".join(line + "\n" for line in keep))
        return open(self.metrics_path, "a", buffering=1)

    def _read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def plot_loss(self, path: Path | None = None) -> str | None:
        rows = [r for r in self._read_metrics() if "loss" in r]
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
                loss, gn = self.train_step(x0, y)
                self.step += 1
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
                row = None
                if log_now or eval_now:
                    acc = torch.stack([self._acc_loss, self._acc_gn])
                    if self.world_size > 1:
                        dist.all_reduce(acc)
                        acc /= self.world_size
                    n = max(self._acc_n, 1)
                    mean_loss, mean_gn = (acc / n).tolist()
                    dt = time.perf_counter() - t_mark
                    train_time += dt
                    t_mark = time.perf_counter()
                    last_loss = mean_loss
                    # steps_per_s: this interval's training rate (side work excluded)
                    row = {"step": s, "loss": mean_loss, "grad_norm": mean_gn, "lr": self._lr_at(s - 1),
                           "epoch": self.order.epoch, "steps_per_s": (s - log_step) / max(interval_t + dt, 1e-9)}
                    log_step, interval_t = s, 0.0
                    self._acc_loss.zero_()
                    self._acc_gn.zero_()
                    self._acc_n = 0
                    bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
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
        summary = {
            "name": cfg.name, "out": str(self.out), "steps": self.step, "start_step": start,
            "final_loss": last_loss, "train_time_s": train_time,
            "steps_per_s": (self.step - start) / train_time if train_time > 0 else None,
            "params": count_params(self.model), "checkpoint": str(self.ckpt_path),
            "samples": self.last_grid, "evals": evals, "world_size": self.world_size,
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
    """Rebuild the model of a training checkpoint for sampling. Returns (model, schedule, info)
    with info = the checkpoint's config, model_args, data and step."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    st = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(st, dict) or st.get("format") != "speed_train/1":
        raise ValueError(f"{path} is not a speed-kernels training checkpoint")
    model = build_model(**st["model_args"])
    model.load_state_dict(st["ema" if use_ema else "model"])
    model.to(device).eval()
    cfg = st["config"]
    schedule = make_schedule(cfg["schedule"], cfg["T"])
    info = {"config": cfg, "model_args": st["model_args"], "data": st["data"], "step": st["step"]}
    return model, schedule, info
