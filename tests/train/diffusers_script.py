"""Helpers for tests/train/test_diffusers_real.py and benchmarks/diffusers_client.py: run the diffs
of docs/adapters.md as code, on the real diffusers package.

A diff block of docs/adapters.md is read into *segments* (the runs of lines between the `...`
elision lines). ``DocDiff.program("before")`` keeps the context and "-" lines: the script as
diffusers ships it; ``program("after")`` keeps the context and "+" lines: the script with our
adapter swapped in. Each segment is dedented on its own (they sit at different depths of the
script) and joined. The segments before the first one that draws noise (``randn``) are the set-up,
run once; the rest is one training step, run per step. So the code the tests execute is the text
of the doc, and the doc cannot drift from what is tested.

Nothing here is copied from diffusers: the doc's diffs quote the lines of the scripts they change,
and the stand-ins (``Accelerator``, ``get_sigmas``) are written from what the scripts use them for.
"""
from __future__ import annotations

import contextlib
import re
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS_MD = ROOT / "docs" / "adapters.md"

UNCONDITIONAL = "train_unconditional.py"
TEXT_TO_IMAGE = "examples/*/train_*.py"
SD3 = "train_dreambooth_sd3.py"


# ------------------------------------------------------------------------------ the doc's diffs
def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of each '## ' section of a markdown file."""
    parts = re.split(r"^## (.*)$", text, flags=re.M)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


@dataclass
class DocDiff:
    heading: str
    lines: list[str]  # the fenced block's lines, diff column included

    def segments(self) -> list[list[str]]:
        segs, cur = [], []
        for line in self.lines:
            if line[1:].strip() == "...":
                segs.append(cur)
                cur = []
            else:
                cur.append(line)
        segs.append(cur)
        return [s for s in segs if s]

    def _keep(self, line: str, side: str) -> str | None:
        mark = line[:1]
        if mark not in ("+", "-", " ", ""):
            raise ValueError(f"{self.heading}: not a diff line: {line!r}")
        if mark == ("-" if side == "after" else "+"):
            return None
        return line[1:]

    def _code(self, segs, side: str) -> str:
        out = []
        for seg in segs:
            kept = [k for k in (self._keep(line, side) for line in seg) if k is not None]
            if any(k.strip() for k in kept):
                out.append(textwrap.dedent("\n".join(kept)).strip("\n"))
        return "\n".join(out) + "\n"

    def split(self) -> int:
        """Index of the first segment of the training step (the first that draws noise)."""
        for i, seg in enumerate(self.segments()):
            if any("randn" in line for line in seg):
                return i
        raise ValueError(f"{self.heading}: no segment draws noise (randn)")

    def program(self, side: str) -> tuple[str, str]:
        """(set-up code, step code) of the script before or after the diff."""
        if side not in ("before", "after"):
            raise ValueError(side)
        segs, k = self.segments(), self.split()
        return self._code(segs[:k], side), self._code(segs[k:], side)

    def added(self) -> list[str]:
        return [line[1:].strip() for line in self.lines if line.startswith("+")]


def doc_diff(heading_contains: str, path: Path = ADAPTERS_MD) -> DocDiff:
    """The first ```diff block of the section of docs/adapters.md whose heading contains the text."""
    hits = [(h, b) for h, b in _sections(path.read_text()) if heading_contains in h]
    if len(hits) != 1:
        raise LookupError(f"{path.name}: {len(hits)} sections have {heading_contains!r} in their heading")
    heading, body = hits[0]
    m = re.search(r"^```diff\n(.*?)^```", body, flags=re.M | re.S)
    if m is None:
        raise LookupError(f"{path.name}: section {heading!r} has no ```diff block")
    return DocDiff(heading, m.group(1).rstrip("\n").split("\n"))


def replace_once(code: str, old: str, new: str) -> str:
    """code with the single occurrence of old replaced (a test's one deliberate edit of the doc's code)."""
    if code.count(old) != 1:
        raise AssertionError(f"expected {old!r} once in the doc's code, found it {code.count(old)} times:\n{code}")
    return code.replace(old, new)


# ------------------------------------------------------------------------------ what the scripts use
class Accelerator:
    """The part of accelerate.Accelerator the scripts' loops call: one process, no mixed precision."""

    process_index = 0
    sync_gradients = True

    @staticmethod
    def accumulate(model):
        return contextlib.nullcontext()

    @staticmethod
    def backward(loss):
        loss.backward()


class FixedDraws:
    """`torch` for a script whose random time steps must be given ones: ``randint`` returns them
    (and records its arguments); everything else is torch."""

    def __init__(self, timesteps: torch.Tensor):
        self._t = timesteps
        self.randint_calls: list = []

    def randint(self, *args, **kwargs):
        self.randint_calls.append((args, kwargs))
        return self._t.clone()

    def __getattr__(self, name):
        return getattr(torch, name)


def get_sigmas_for(scheduler):
    """The SD3/FLUX scripts' ``get_sigmas(timesteps, n_dim, dtype)``: the scheduler's sigma at each
    of its own time steps, shaped to broadcast over an n_dim batch."""

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        grid = scheduler.timesteps.to(timesteps.device)  # descending
        t = timesteps.to(grid.dtype)
        pos = torch.searchsorted(grid.flip(0), t).clamp(max=grid.numel() - 1)
        idx = grid.numel() - 1 - pos
        if not bool((grid[idx] == t).all()):
            raise ValueError("a time step is not on the scheduler's grid")
        sigma = scheduler.sigmas.to(timesteps.device, dtype)[idx]
        return sigma.view(-1, *([1] * (n_dim - 1)))

    return get_sigmas


def script_globals(**names) -> dict:
    """A namespace with what the scripts import (torch, F, the diffusers classes) plus `names`."""
    import diffusers
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    ns = {
        "torch": torch, "F": F, "np": np, "accelerator": Accelerator(), "weight_dtype": torch.float32,
        "DDPMScheduler": diffusers.DDPMScheduler,
        "FlowMatchEulerDiscreteScheduler": diffusers.FlowMatchEulerDiscreteScheduler,
        "compute_density_for_timestep_sampling": compute_density_for_timestep_sampling,
        "compute_loss_weighting_for_sd3": compute_loss_weighting_for_sd3,
    }
    ns.update(names)
    return ns


def unconditional_args(**over) -> types.SimpleNamespace:
    """train_unconditional.py's arguments the diffed lines read (its defaults)."""
    a = dict(ddpm_num_steps=1000, ddpm_beta_schedule="linear", prediction_type="epsilon")
    a.update(over)
    return types.SimpleNamespace(**a)


# ------------------------------------------------------------------------------ model, data, sampling
def tiny_unet(seed: int = 0):
    """diffusers' UNet2DModel for 8x8 one-channel images (about 160k parameters), seeded init."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def digits() -> torch.Tensor:
    """The embedded digits, float32 [1797, 1, 8, 8] in [-1, 1]."""
    from speed_train.data import load_dataset

    return load_dataset("digits").images


class StepRunner:
    """Runs a doc program: its set-up once, then its step per batch, on one namespace."""

    def __init__(self, diff: DocDiff, side: str, model, *, edit=None, **names):
        setup, step = diff.program(side)
        if edit is not None:
            setup, step = edit(setup, step)
        self.setup_code, self.step_code = setup, step
        self.ns = script_globals(model=model, **names)
        exec(compile(setup, f"<{diff.heading} {side}: set-up>", "exec"), self.ns)
        self._step = compile(step, f"<{diff.heading} {side}: step>", "exec")

    def step(self, **names) -> dict:
        self.ns.update(names)
        exec(self._step, self.ns)
        return self.ns


def train(runner: StepRunner, data: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int = 0,
          log_every: int = 0, after_step=None) -> list[float]:
    """`steps` AdamW steps of the runner's program on random batches; the losses. ``after_step()``
    runs after each optimiser step (an EMA update, say)."""
    model = runner.ns["model"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the scripts draw their noise from the global generator
    model.train()
    losses = []
    for i in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        ns = runner.step(batch={"input": data[idx]})
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the script's clip_grad_norm_(…, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(float(ns["loss"].detach()))
        if log_every and (i + 1) % log_every == 0:
            print(f"step {i + 1}: loss {np.mean(losses[-log_every:]):.4f}", flush=True)
    return losses


@torch.no_grad()
def eval_loss(model, scheduler, data: torch.Tensor, n: int = 256, seed: int = 123) -> float:
    """The script's own ε loss (uniform t, its add_noise) on a fixed batch, t and noise."""
    gen = torch.Generator().manual_seed(seed)
    x = data[torch.randint(0, data.shape[0], (n,), generator=gen)]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    was = model.training
    model.eval()
    out = model(scheduler.add_noise(x, noise, t), t).sample
    model.train(was)
    return float(F.mse_loss(out, noise))


def ddim_samples(model, train_scheduler, n: int = 64, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """Samples of diffusers' DDIMPipeline with a DDIMScheduler made from the training scheduler's
    config (no conversion of the model), mapped back to [-1, 1]: float32 [n, 1, 8, 8]."""
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(train_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                  output_type="np").images  # [n, H, W, C] in [0, 1]
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) * 2 - 1


def nearest_data_distance(x: torch.Tensor, data: torch.Tensor) -> float:
    """Mean over x of the L2 distance to the nearest data image."""
    return float(torch.cdist(x.flatten(1).double(), data.flatten(1).double()).min(1).values.mean())


def mean_image_correlation(x: torch.Tensor, data: torch.Tensor) -> float:
    """Pearson correlation of x's per-pixel mean with the data's (the digits' dark border, lit middle)."""
    a, b = x.mean(0).flatten().double(), data.mean(0).flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))
