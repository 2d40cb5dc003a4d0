"""Samplers for trained denoisers: DDPM ancestral and DDIM (eta = 0) on respaced steps.

Both take a model trained on the full T-step schedule, pick ``steps`` of its time steps
evenly (always including the noisiest, T-1, and 0), and rebuild the short chain's
coefficients from ᾱ at those steps, as guided-diffusion's SpacedDiffusion does. The
model always sees the original step indices.

- predictions ``eps`` / ``v`` / ``x0`` are all converted to (x0, eps) first;
- learned σ (2C output channels): DDPM uses the model's variance, interpolated in log
  space between the respaced β and the clipped posterior variance (DiT's "learned range");
  DDIM ignores it; without learned σ DDPM uses the posterior variance β̃ ("fixed small");
- classifier-free guidance with ``guidance`` > 1 and labels ``y``: one batched call on the
  conditional and the null class, combined on the prediction channels (pred is affine in
  eps for a given x_t, so this is the same as guiding eps);
- x0 is clipped to [-1, 1] for pixel data (``clip=True``), not for latents;
- the noise comes from a CPU ``torch.Generator(seed)``, so a seed gives the same samples
  on any device and never touches the global RNG.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["sample", "respace", "save_grid", "to_uint8_grid", "flow_sample", "flow_sigmas", "flow_velocity"]


def respace(alphas_cumprod, steps: int):
    """Evenly spaced step indices (ascending, including 0 and T-1) and ᾱ at them, float64."""
    ac = np.asarray(torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu())
    T = len(ac)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    use = np.unique(np.round(np.linspace(0, T - 1, steps)).astype(np.int64))
    return use, ac[use]


def _chain(ac_s: np.ndarray):
    """Coefficients of the respaced chain, float64 numpy arrays indexed by position."""
    ac_prev = np.append(1.0, ac_s[:-1])
    betas = 1.0 - ac_s / ac_prev
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac_s)
    # log of the posterior variance with the t=0 entry (zero) replaced by the next one
    post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(ac_s) > 1 else np.log(np.maximum(betas, 1e-20))
    return dict(
        ac=ac_s, ac_prev=ac_prev, betas=betas, post_logvar=post_logvar,
        coef1=betas * np.sqrt(ac_prev) / (1.0 - ac_s),
        coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac_s),
    )


def _split_pred(out, x_t, a, prediction: str, clip: bool):
    """(x0, eps) from the model's prediction at ᾱ = a (python float)."""
    sa, s1 = math.sqrt(a), math.sqrt(1.0 - a)
    if prediction == "eps":
        x0 = (x_t - s1 * out) / sa
    elif prediction == "x0":
        x0 = out
    elif prediction == "v":
        x0 = sa * x_t - s1 * out
    else:
        raise ValueError(f"prediction must be eps, v or x0, got {prediction!r}")
    if clip:
        x0 = x0.clamp(-1, 1)
    eps = (x_t - sa * x0) / s1  # consistent with the (clipped) x0
    return x0, eps


@torch.no_grad()
def sample(model, schedule, shape, *, sampler: str = "ddim", steps: int = 50, prediction: str = "eps",
           learn_sigma: bool = False, y: torch.Tensor | None = None, guidance: float = 1.0,
           clip: bool = True, seed: int = 0, device=None, autocast_dtype=None, progress: bool = False):
    """Draw len(shape[0]) samples. `schedule` is a NoiseSchedule (or anything with
    alphas_cumprod). Returns float32 [N, C, H, W] on `device`, in [-1, 1] when clip."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be ddpm or ddim, got {sampler!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    use, ac_s = respace(schedule.alphas_cumprod, steps)
    c = _chain(ac_s)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(shape, generator=gen).to(device)
    C = shape[1]
    guided = y is not None and guidance != 1.0
    if y is not None:
        y = y.to(device)
    if guided:
        null = getattr(model, "num_classes", None)
        if not null:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        y_in = torch.cat([y, torch.full_like(y, null)])
    was_training = model.training
    model.eval()
    it = range(len(use) - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"{sampler}-{len(use)}", leave=False)
    try:
        for i in it:
            t = torch.full((shape[0],), int(use[i]), dtype=torch.long, device=device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if guided:
                    out = model(torch.cat([x, x]), torch.cat([t, t]), y=y_in)
                else:
                    out = model(x, t, y=y)
            out = out.float()
            if guided:
                cond, unc = out.chunk(2)
                out = torch.cat([unc[:, :C] + guidance * (cond[:, :C] - unc[:, :C]), cond[:, C:]], dim=1)
            pred, var = (out[:, :C], out[:, C:]) if learn_sigma else (out, None)
            x0, eps = _split_pred(pred, x, float(c["ac"][i]), prediction, clip)
            if sampler == "ddim":
                x = math.sqrt(c["ac_prev"][i]) * x0 + math.sqrt(1.0 - c["ac_prev"][i]) * eps
                continue
            mean = float(c["coef1"][i]) * x0 + float(c["coef2"][i]) * x
            if i == 0:
                x = mean
                continue
            if var is not None:
                frac = (var.clamp(-1, 1) + 1) / 2
                logvar = frac * math.log(c["betas"][i]) + (1 - frac) * float(c["post_logvar"][i])
                std = torch.exp(0.5 * logvar)
            else:
                std = math.exp(0.5 * float(c["post_logvar"][i]))
            x = mean + std * torch.randn(shape, generator=gen).to(device)
    finally:
        model.train(was_training)
    return x.clamp(-1, 1) if clip else x


def to_uint8_grid(samples: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int | None = None) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> an H' x W' (x 3) uint8 grid. Tiles are upscaled (nearest)
    to at least 48 px so 8x8 digits can be seen; channels other than 1 or 3 (latents)
    show their first three, min-max scaled."""
    s = samples.detach().float().cpu()
    if s.ndim != 4:
        raise ValueError(f"samples must be [N, C, H, W], got {tuple(s.shape)}")
    if s.shape[1] not in (1, 3):
        s = s[:, :3] if s.shape[1] > 3 else s[:, :1]
        s = (s - s.amin()) / (s.amax() - s.amin() + 1e-8) * 2 - 1
    N, C, H, W = s.shape
    scale = scale or max(1, math.ceil(48 / H))
    if scale > 1:
        s = s.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        H, W = H * scale, W * scale
    nrow = nrow or math.ceil(math.sqrt(N))
    rows = math.ceil(N / nrow)
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 128, dtype=np.uint8)
    img = ((s.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k in range(N):
        r, q = divmod(k, nrow)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + q * (W + pad): pad + q * (W + pad) + W] = img[k]
    return grid[..., 0] if C == 1 else grid


def save_grid(samples: torch.Tensor, path, nrow: int | None = None) -> str:
    """Write samples in [-1, 1] as one PNG grid; returns the path."""
    from PIL import Image
    import os

    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    Image.fromarray(to_uint8_grid(samples, nrow)).save(str(path))
    return str(path)


# ============================================================================================
# Flow matching (speed_kernels.FlowMatchingLoss): ODE samplers on sigma from 1 (noise) to 0.
# ============================================================================================
FLOW_SAMPLERS = ("euler", "heun")


def flow_sigmas(steps: int, shift: float = 1.0) -> np.ndarray:
    """steps + 1 descending sigmas: linspace(1, 0) through the shift s sigma / (1 + (s - 1) sigma)
    (the shift keeps the ends at 1 and 0). The same shift as FlowMatchEulerDiscreteScheduler's, not
    quite its grid: diffusers' set_timesteps(steps) shifts linspace(1, sigma_min) (sigma_min its
    shifted 1/1000) and appends 0, so its last step starts near 0 (tests/train/test_diffusers_real.py)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    s = np.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_velocity(out, x, sigma: float, prediction: str, min_gap: float = 1e-4):
    """dx/dsigma = eps - x0 from the model's output at sigma. x0 and eps predictions are converted
    through x = (1 - sigma) x0 + sigma eps (dividing by sigma or 1 - sigma, floored at min_gap).
    An eps prediction carries no velocity at sigma = 1 (eps = x there): the first step from pure
    noise is then blind, which is why flow models predict v."""
    if prediction == "v":
        return out
    if prediction == "x0":
        return (x - out) / max(sigma, min_gap)
    if prediction == "eps":
        return (out - x) / max(1.0 - sigma, min_gap)
    raise ValueError(f"prediction must be v, x0 or eps, got {prediction!r}")


@torch.no_grad()
def flow_sample(model, shape, *, sampler: str = "euler", steps: int = 50, shift: float = 1.0,
                prediction: str = "v", y: torch.Tensor | None = None, guidance: float = 1.0,
                clip: bool = True, seed: int = 0, device=None, autocast_dtype=None, time_scale: float = 1000.0):
    """Integrate dx/dsigma = v(x, sigma) from sigma = 1 (x ~ N(0, I) from a CPU generator) to 0.
    The model is called as model(x, sigma * time_scale, y=y), as trained by the flow objective.
    "euler": one evaluation per step; "heun": Heun's second-order step (two evaluations, Euler on
    the last step to sigma = 0). Classifier-free guidance combines the velocities."""
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"sampler must be one of {FLOW_SAMPLERS}, got {sampler!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sig = flow_sigmas(steps, shift)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(shape, generator=gen).to(device)
    guided = y is not None and guidance != 1.0
    if y is not None:
        y = y.to(device)
    if guided:
        null = getattr(model, "num_classes", None)
        if not null:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        y_in = torch.cat([y, torch.full_like(y, null)])

    def vel(x_cur, s: float):
        t = torch.full((shape[0],), s * time_scale, dtype=torch.float32, device=device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if guided:
                out = model(torch.cat([x_cur, x_cur]), torch.cat([t, t]), y=y_in).float()
                cond, unc = out.chunk(2)
                out = unc + guidance * (cond - unc)
            else:
                out = model(x_cur, t, y=y).float()
        return flow_velocity(out, x_cur, s, prediction)

    was_training = model.training
    model.eval()
    try:
        for i in range(steps):
            s, s_next = float(sig[i]), float(sig[i + 1])
            v1 = vel(x, s)
            x_euler = x + (s_next - s) * v1
            if sampler == "heun" and s_next > 0:
                v2 = vel(x_euler, s_next)
                x = x + (s_next - s) * 0.5 * (v1 + v2)
            else:
                x = x_euler
    finally:
        model.train(was_training)
    return x.clamp(-1, 1) if clip else x
