"""The SD3/FLUX-script adapter of docs/adapters.md against the script's formulas, re-implemented
here from diffusers' training utilities (shared/FLOW.md): the `diffusers` package is not installed
in this environment (no network), so its own functions could not be called."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from speed_kernels import FlowMatchingLoss, rng
from speed_kernels.flow_strategies import from_diffusers


def oracle_density(scheme, bsz, logit_mean, logit_std, mode_scale, gen):
    """compute_density_for_timestep_sampling (torch, CPU)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, size=(bsz,), generator=gen))
    if scheme == "mode":
        u = torch.rand(bsz, generator=gen)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return torch.rand(bsz, generator=gen)


def oracle_weighting(scheme, sigmas):
    """compute_loss_weighting_for_sd3."""
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def oracle_scheduler_sigmas(n=1000, shift=1.0):
    """FlowMatchEulerDiscreteScheduler's training sigmas: descending from 1, shifted."""
    t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
    s = t / n
    return torch.from_numpy(shift * s / (1 + (shift - 1) * s))


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_script_draw_law_matches(scheme, shift):
    kw = dict(logit_mean=0.6, logit_std=1.0, mode_scale=1.29)
    gen = torch.Generator().manual_seed(0)
    u = oracle_density(scheme, 30000, gen=gen, **kw)
    idx = (u * 1000).long().clamp(max=999)
    script_sigmas = oracle_scheduler_sigmas(shift=shift)[idx].double().numpy()
    flow = FlowMatchingLoss(from_diffusers(scheme, shift=shift, **kw), backend="torch", seed=1)
    _, ours = flow.noise(torch.zeros(30000, 1))
    # the script's sigma is on a 1/1000 grid: compare the two samples, not a CDF
    assert stats.ks_2samp(script_sigmas, ours.double().numpy()).pvalue > 1e-3


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap", "sigma_sqrt"])
@pytest.mark.parametrize("precondition", [False, True])
def test_script_loss_matches(scheme, precondition):
    gen = torch.Generator().manual_seed(3)
    model_input = torch.randn(5, 4, 6, 6, generator=gen)
    flow = FlowMatchingLoss(from_diffusers(scheme, clamp=(0.05, 1.0)), prediction="x0" if precondition else "v",
                            backend="torch", seed=8)
    noisy, sig = flow.noise(model_input)
    noise = rng.normal_per_element(5, 144, torch.tensor(0), flow.k0, flow.k1).view(model_input.shape)
    sigmas = sig.view(-1, 1, 1, 1)
    raw = torch.randn(model_input.shape, generator=gen, requires_grad=True)  # the transformer's output

    # the script
    torch.testing.assert_close(noisy, (1.0 - sigmas) * model_input + sigmas * noise, rtol=1e-5, atol=1e-6)
    model_pred = raw * (-sigmas) + noisy if precondition else raw
    target = model_input if precondition else noise - model_input
    weighting = oracle_weighting(scheme, sigmas)
    want = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(5, -1), 1).mean()
    (g_want,) = torch.autograd.grad(want, raw)

    # the adapter
    pred = noisy - sigmas * raw if precondition else raw
    got = flow.loss(pred, model_input, sig)
    (g_got,) = torch.autograd.grad(got, raw)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(g_got, g_want, rtol=2e-5, atol=1e-8)
