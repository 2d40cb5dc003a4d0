"""The training loop: one denoiser, one DiffusionLoss (the strategy's sampling and weighting
on the fused loss path), AdamW, EMA, checkpoints that resume the run exactly, torchrun.

Its parts: the settings and their defaults in speed_train.config (TrainConfig), ranks and the
process group in speed_train.distributed, non-finite steps in speed_train.faults, run.json,
metrics.jsonl and the loss plot in speed_train.records.

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
read (``.item()``) only at side steps (log, checkpoint, sample, eval, end); non-finite steps are
caught before anything is written (when and how: speed_train.faults), so a poisoned state is
never checkpointed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .config import TrainConfig, config_for_resume, make_loss, make_schedule, validate_config
from .data import DataOrder, load_dataset
from .distributed import (any_rank, average_gradients, barrier, broadcast_from_main, gather_cat, gather_objects,
                          join_process_group, leave_process_group, learns_from_losses, max_over_ranks,
                          mean_over_ranks, pick_device, ranks_from_env, wrap_ddp)
from .faults import NonFiniteError, checks_every_step, nonfinite, note_first_bad, stop_message
from .models import build_model, count_params
from .records import describe_backend, git_commit, open_metrics, plot_loss, read_metrics, run_record, write_text_atomic
from .sampling import sample as _sample, save_grid

__all__ = ["TrainConfig", "Trainer", "NonFiniteError", "load_checkpoint_model", "make_schedule", "validate_config"]

# the names these had when they lived here, still importable from here
_pick_device = pick_device
_git_commit = git_commit
_learns_from_losses = learns_from_losses


def _cpu(obj):
    """Checkpoint-friendly copy: tensors to CPU, containers recursively."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class Trainer:
    """``Trainer(cfg).run()`` trains and returns a summary dict. Under torchrun (WORLD_SIZE > 1)
    it joins the process group itself (gloo on CPU, NCCL on CUDA).

    ``explicit``: on resume, the names of the settings the caller chose (the CLI passes the
    flags given on its command line); the others take the checkpoint's values. None (the
    Python API): every setting counts as chosen except those left None (auto)."""

    def __init__(self, cfg: TrainConfig, explicit=None):
        validate_config(cfg)  # before any work
        self.world_size, self.rank, self.local_rank = ranks_from_env()
        self._own_pg = False
        try:
            self._setup(cfg, explicit)
        except BaseException:
            self.close()  # a refused resume or bad setting must not leave a process group behind
            raise

    def _setup(self, cfg: TrainConfig, explicit):
        self.device = pick_device(cfg.device, self.local_rank)
        # several ranks on one CPU: one thread each, or OpenMP threads fight over the cores
        threads = cfg.threads or (1 if self.world_size > 1 and self.device.type == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        self._own_pg = join_process_group(self.device, self.world_size)
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
                self.device = pick_device(cfg.device, self.local_rank)
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
                              and learns_from_losses(self.loss_fn.strategy))
        if self.gather_losses:  # each rank updates the strategy from every rank's losses
            self.loss_fn = make_loss(cfg, self.schedule, rank=self.rank, auto_update=False)
        self.backend_info = describe_backend(self.loss_fn, self.device, cfg.backend)

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.model_args = dict(name=cfg.model, in_channels=C, image_size=H, num_classes=self.num_classes,
                               learn_sigma=cfg.learn_sigma, class_dropout=cfg.class_dropout)
        self.model = build_model(**self.model_args).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        torch.manual_seed(cfg.seed + 7919 * self.rank)  # label dropout differs across ranks
        np.random.seed((cfg.seed + 7919 * self.rank) % 2**32)

        fwd = wrap_ddp(self.model, self.device, self.world_size)
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
        self._check_every_step = checks_every_step(self.device, cfg.skip_nonfinite, self.loss_fn.strategy)
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
        cfg, self.override_diffs = config_for_resume(raw, cfg, state.get("config", {}), explicit, where)
        return cfg

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
            self.loss_fn.update_strategy(gather_cat(t, self.world_size), gather_cat(per, self.world_size))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.strategy_params, self.world_size)  # the strategy's own: outside DDP
        if cfg.grad_clip:
            gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            gn = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        loss, gn = loss.detach(), gn.detach()
        bad = nonfinite(loss, gn)
        if self._check_every_step:
            if bool(any_rank(bad, self.world_size)):  # a NaN on one rank: every rank skips or stops together
                return self._on_nonfinite(loss, gn)
        else:
            self._first_bad = note_first_bad(self._first_bad, bad, self.step + 1)
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
        raise NonFiniteError(stop_message(step, loss, gn, self.skipped, self.last_good_ckpt, self.cfg.skip_nonfinite))

    def _check_finite(self):
        """The deferred (CUDA) check, at a side step, before anything is logged or saved."""
        if not self._check_every_step:
            first = int(max_over_ranks(self._first_bad, self.world_size))
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
        ranks = gather_objects(self._rank_state(), self.world_size)
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
        error = broadcast_from_main(error, self.world_size)  # rank 0 tells every rank: nobody waits on a dead writer
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

    # ------------------------------------------------------------------ logs (speed_train.records)

    def _write_run_json(self):
        write_text_atomic(self.out / "run.json", json.dumps(run_record(self), indent=2, default=str))

    def _open_metrics(self):
        return open_metrics(self.metrics_path, self.resumed_from)

    def _read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def plot_loss(self, path: Path | None = None) -> str | None:
        return plot_loss(self._read_metrics(), Path(path or self.out / "loss.png"),
                         title=f"{self.cfg.name}: {self.cfg.strategy}, {self.cfg.model}")

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
                    acc = mean_over_ranks(torch.stack([self._acc_loss, self._acc_gn]), self.world_size)
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
                if eval_now or last:
                    barrier(self.world_size)  # the others wait while rank 0 evaluates
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
        if self._own_pg and leave_process_group():
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
