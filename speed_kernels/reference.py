"""The plain-PyTorch reference of the two ops, written for clarity, not speed.

It is the `torch` backend, the fallback, and the oracle every kernel is tested against.
Arithmetic is float32 whatever the input dtype (float64 inputs stay float64 so tests can build
a float64 ground truth); gradients come from autograd.
"""
from __future__ import annotations

import math

import torch

from . import rng
from .tables import (
    LN2,
    ROW_CDF,
    ROW_LOG_BETA,
    ROW_POST_LOGVAR,
    ROW_POST_X0,
    ROW_POST_XT,
    ROW_SQRT_1MAB,
    ROW_SQRT_AB,
    ROW_WEIGHT,
    ROW_X0HAT_OUT,
    ROW_X0HAT_XT,
)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather a [T] row at t and shape it [B, 1, 1, ...] to broadcast against `like`."""
    return coef[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def regenerate_eps(shape, call: torch.Tensor, k0: int, k1: int, device) -> torch.Tensor:
    """The eps of the noise call with index `call` (float32, shape of x0)."""
    batch = shape[0]
    n = math.prod(shape[1:])
    return rng.normal_per_element(batch, n, call, k0, k1, device=device).view(shape)


def noise(x0, t_in, tables, k0, k1, call, mirror: bool, pivot: int):
    """Draw t (unless given) and eps; return (x_t in x0's dtype, t int64). Advances `call`."""
    batch = x0.shape[0]
    if t_in is None:
        t = rng.sample_timesteps(batch, tables[ROW_CDF], call, k0, k1, mirror, pivot)
    else:
        t = t_in
    x_t = mix(x0, t, regenerate_eps(x0.shape, call, k0, k1, x0.device), tables)
    call.add_(1)
    return x_t, t


def mix(x0, t, eps, tables):
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps in x0's dtype (arithmetic in float32, or float64)."""
    cd = _compute_dtype(x0)
    xf = x0.to(cd)
    x_t = _per_sample(tables[ROW_SQRT_AB], t, xf) * xf + _per_sample(tables[ROW_SQRT_1MAB], t, xf) * eps.to(cd)
    return x_t.to(x0.dtype)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation guided-diffusion uses in its discretized Gaussian likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data quantised to 256 bins on [-1, 1] (guided-diffusion's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def loss_terms(pred, x0, t, eps, tables, target: int, learn_sigma: bool):
    """Per-sample (weighted MSE, VLB) of a batch, differentiable w.r.t. `pred`.

    MSE = weights[t] * mean over non-batch dims of (out - target)^2 with target eps / v / x0.
    With learned sigma, `pred` holds 2C channels (out, v): VLB = KL(q(x_{t-1}|x_t,x0) || p) in
    bits with the model mean detached and log-variance f*log(beta_t) + (1-f)*log(beta~_t),
    f = (v+1)/2; at t = 0 the discretized-Gaussian NLL of x0 instead (guided-diffusion / DiT)."""
    cd = _compute_dtype(pred)
    x0f = x0.to(cd)
    epsf = eps.to(cd)
    pf = pred.to(cd)
    channels = x0.shape[1] if learn_sigma else None
    out = pf[:, :channels] if learn_sigma else pf
    sab = _per_sample(tables[ROW_SQRT_AB], t, x0f)
    s1mab = _per_sample(tables[ROW_SQRT_1MAB], t, x0f)
    if target == 0:
        tgt = epsf
    elif target == 1:
        tgt = sab * epsf - s1mab * x0f
    else:
        tgt = x0f
    dims = tuple(range(1, x0.dim()))
    mse = (out - tgt).pow(2).mean(dim=dims) * tables[ROW_WEIGHT][t].to(cd)
    if not learn_sigma:
        return mse, torch.zeros_like(mse)
    v = pf[:, channels:]
    x_t = sab * x0f + s1mab * epsf
    c_x0 = _per_sample(tables[ROW_POST_X0], t, x0f)
    x0_hat = _per_sample(tables[ROW_X0HAT_XT], t, x0f) * x_t + _per_sample(tables[ROW_X0HAT_OUT], t, x0f) * out.detach()
    # Both posterior means share c_xt * x_t: their difference is c_x0 * (x0 - x0_hat), formed
    # directly so float32 does not cancel two nearly equal means (guided-diffusion does).
    mean_diff = c_x0 * (x0f - x0_hat)
    mean_model = c_x0 * x0_hat + _per_sample(tables[ROW_POST_XT], t, x0f) * x_t
    logvar_true = _per_sample(tables[ROW_POST_LOGVAR], t, x0f)
    min_log = logvar_true
    max_log = _per_sample(tables[ROW_LOG_BETA], t, x0f)
    frac = (v + 1.0) / 2.0
    logvar_model = frac * max_log + (1.0 - frac) * min_log
    kl = 0.5 * (
        -1.0
        + logvar_model
        - logvar_true
        + torch.exp(logvar_true - logvar_model)
        + mean_diff.pow(2) * torch.exp(-logvar_model)
    )
    nll = -discretized_gaussian_log_likelihood(x0f, mean_model, 0.5 * logvar_model)
    vb = torch.where(t.view(-1, *([1] * (x0.dim() - 1))) == 0, nll, kl).mean(dim=dims) / LN2
    return mse, vb


def loss(pred, x0, t, tables, k0, k1, call, target: int, learn_sigma: bool, reduce_mean: bool, eps=None):
    """(loss, terms): loss is the batch mean (scalar) or per-sample [B]; terms is a detached
    float32 [2, B] of (weighted MSE, VLB). eps is regenerated from call-1 unless given."""
    if eps is None:
        eps = regenerate_eps(x0.shape, call - 1, k0, k1, x0.device)
    mse, vb = loss_terms(pred, x0, t, eps, tables, target, learn_sigma)
    per_sample = mse + vb
    terms = torch.stack([mse.detach(), vb.detach()]).to(torch.float32)
    return (per_sample.mean() if reduce_mean else per_sample), terms


# =============================================================================================
# Flow matching (speed_kernels.flow.FlowMatchingLoss): x_t = (1 - sigma) x0 + sigma eps.
# Appended section, owned by the flow-matching work; the DDPM ops above are untouched.
# Flow table: float32 [FLOW_NUM_ROWS, N + 1] (speed_kernels.flow.build_flow_tables): inverse-CDF
# quantiles q, their truncated slopes dq, and the weight's smooth part on sigma = i / N.
# =============================================================================================
FLOW_STREAM_SIGMA = 2  # Philox stream of the sigma uniform (t uses 0, eps uses 1)
FLOW_ROW_Q = 0
FLOW_ROW_DQ = 1
FLOW_ROW_W = 2
FLOW_NUM_ROWS = 3


def flow_sigma_uniform(batch: int, call: torch.Tensor, k0: int, k1: int, device) -> torch.Tensor:
    """u of each sample (float32 [batch]): word 0 of philox(0, sample, call, FLOW_STREAM_SIGMA)."""
    idx = torch.arange(batch, dtype=torch.int64, device=device)
    w0, _, _, _ = rng.philox4x32(0, idx, call.reshape(()).to(device), FLOW_STREAM_SIGMA, k0, k1)
    return rng.bits_to_uniform(w0)


def flow_sigma_from_uniform(u: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """sigma = q[j] + f * dq[j], pos = u * N, j = floor(pos), f = pos - j (all float32, every
    step exact but the final add: bit-identical across backends)."""
    n = tables.shape[1] - 1
    pos = u * float(n)
    j = pos.to(torch.int64).clamp_(0, n - 1)  # pos >= 0: truncation is floor
    f = pos - j.to(torch.float32)
    return tables[FLOW_ROW_Q][j] + f * tables[FLOW_ROW_DQ][j]


def flow_draw_sigma(batch: int, tables, k0, k1, call) -> torch.Tensor:
    return flow_sigma_from_uniform(flow_sigma_uniform(batch, call, k0, k1, tables.device), tables)


def flow_weight(sigma: torch.Tensor, tables: torch.Tensor, inv_sigma2: bool) -> torch.Tensor:
    """Per-sample weight: linear interpolation of the smooth part on sigma = i / N, times
    sigma^-2 for weightings that carry it (computed in sigma's dtype)."""
    row = tables[FLOW_ROW_W].to(sigma.dtype)
    n = row.numel() - 1
    pos = sigma.clamp(0.0, 1.0) * n
    j = pos.to(torch.int64).clamp_(0, n - 1)
    f = pos - j.to(sigma.dtype)
    w = row[j] + f * (row[j + 1] - row[j])
    if inv_sigma2:
        w = w / (sigma * sigma)
    return w


def flow_noise(x0, sigma_in, tables, k0, k1, call):
    """(x_t in x0's dtype, sigma float32 [B]); draws sigma unless given. Advances `call`."""
    sigma = flow_draw_sigma(x0.shape[0], tables, k0, k1, call) if sigma_in is None else sigma_in.to(torch.float32)
    eps = regenerate_eps(x0.shape, call, k0, k1, x0.device)
    cd = _compute_dtype(x0)
    xf = x0.to(cd)
    s = sigma.to(cd).view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1.0 - s) * xf + s * eps.to(cd)
    call.add_(1)
    return x_t.to(x0.dtype), sigma


def flow_target(x0, eps, target: int):
    """Regression target: 0 eps, 1 velocity eps - x0, 2 x0."""
    if target == 0:
        return eps
    if target == 1:
        return eps - x0
    return x0


def flow_loss(pred, x0, sigma, tables, k0, k1, call, target: int, inv_sigma2: bool, reduce_mean: bool, eps=None):
    """(loss, terms): w(sigma) * mean over non-batch dims of (pred - target)^2, batch mean or per
    sample; terms = detached float32 [B] weighted MSE. eps regenerated from call - 1 unless given."""
    if eps is None:
        eps = regenerate_eps(x0.shape, call - 1, k0, k1, x0.device)
    cd = _compute_dtype(pred)
    tgt = flow_target(x0.to(cd), eps.to(cd), target)
    dims = tuple(range(1, x0.dim()))
    w = flow_weight(sigma.to(cd), tables, inv_sigma2)
    per = (pred.to(cd) - tgt).pow(2).mean(dim=dims) * w
    return (per.mean() if reduce_mean else per), per.detach().to(torch.float32)
