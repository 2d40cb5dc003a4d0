"""Our adapters against the real diffusers package (pinned in requirements-dev.txt), on fresh seeded
inputs: DDPMScheduler's add_noise / get_velocity and the --snr_gamma weights against DiffusersLoss;
the SD3 training utilities and FlowMatchEulerDiscreteScheduler against FlowMatchingLoss with
flow_strategies.from_diffusers; and the diffs of docs/adapters.md, read out of the doc and run as
code (tests/train/diffusers_script.py), ending in a diffusers UNet2DModel trained with our loss and
sampled by diffusers' DDIMPipeline.

Skipped without diffusers, failed without it under SPEED_KERNELS_REQUIRE_ALL=1 (tests/required.py).
diffusers builds its schedules in float32 and we in float64: where values are compared, the
tolerance is float32 rounding of the schedule, and the tests say where that is the whole difference.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from required import require_pinned

require_pinned("diffusers")

from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.training_utils import (  # noqa: E402
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    compute_snr,
)

import diffusers_script as ds  # noqa: E402
from speed_kernels import FlowMatchingLoss, rng  # noqa: E402
from speed_kernels import flow_strategies as fs  # noqa: E402
from speed_kernels.tables import ROW_WEIGHT  # noqa: E402
from speed_train.adapters import DiffusersLoss  # noqa: E402
from speed_train.sampling import flow_sigmas  # noqa: E402

ULP1 = 2.0 ** -24  # float32 rounding at 1 (half an ulp)
SCHEMES = ["none", "sigma_sqrt", "cosmap", "logit_normal", "mode"]
SCRIPT_ARGS = dict(logit_mean=0.6, logit_std=1.0, mode_scale=1.29)  # logit_mean != 0: the mirror matters


def ddpm(beta_schedule, prediction_type="epsilon", zero_snr=False, **kw):
    if beta_schedule == "scaled_linear":  # Stable Diffusion's ends
        kw = {"beta_start": 0.00085, "beta_end": 0.012, **kw}
    return DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type,
                         rescale_betas_zero_snr=zero_snr, **kw)


def draws(seed, shape=(12, 3, 8, 8), T=1000):
    """latents, noise, time steps (both ends included) and a model output, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.randint(0, T, (shape[0],), generator=g)
    t[0], t[1] = 0, T - 1
    pred = torch.randn(shape, generator=g)
    return latents, noise, t, pred


def per_sample_bound(theirs_ac, ours_ac, t, a, b):
    """|Δ| allowed between sqrt(ac) a ± sqrt(1 - ac) b computed from diffusers' float32 ac and ours:
    the coefficients' own difference (float32 rounding of the schedule) times |a|, |b|, plus rounding."""
    d1 = (theirs_ac.double().sqrt() - ours_ac.double().sqrt()).abs()[t].float().view(-1, 1, 1, 1)
    d2 = ((1 - theirs_ac.double()).sqrt() - (1 - ours_ac.double()).sqrt()).abs()[t].float().view(-1, 1, 1, 1)
    return d1 * a.abs() + d2 * b.abs() + 4e-6 * (1 + a.abs() + b.abs())


# ------------------------------------------------------------------------------ DDPMScheduler
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddpm_add_noise_and_target_match_diffusers(beta_schedule, prediction_type, zero_snr, seed):
    sched = ddpm(beta_schedule, prediction_type, zero_snr)
    latents, noise, t, pred = draws(seed)
    theirs_ac = sched.alphas_cumprod
    want_xt = sched.add_noise(latents, noise, t)
    want_target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    for backend in ("torch", "auto"):
        ours = DiffusersLoss(sched, strategy="uniform", backend=backend)  # prediction_type from the config
        assert ours.prediction_type == prediction_type
        ours_ac = ours.schedule.alphas_cumprod
        # the schedule: diffusers' float32 cumprod against our float64 one
        torch.testing.assert_close(ours_ac.float(), theirs_ac, rtol=0, atol=2e-6)
        if zero_snr:
            assert float(theirs_ac[-1]) == 0.0 and float(ours_ac[-1]) == 0.0
        xt = ours.add_noise(latents, noise, t)
        assert xt.dtype == latents.dtype
        assert torch.all((xt - want_xt).abs() <= per_sample_bound(theirs_ac, ours_ac, t, latents, noise))
        # the target: from the gradient of the per-sample loss at pred = 0 (d/dpred mean(pred - y)^2 = -2y/D)
        zero = torch.zeros_like(pred, requires_grad=True)
        ours.loss(zero, latents, noise, t, reduction="none").sum().backward()
        target = -zero.grad * (zero[0].numel() / 2)
        a, b = (noise, latents) if prediction_type == "v_prediction" else (noise, torch.zeros_like(noise))
        assert torch.all((target - want_target).abs() <= per_sample_bound(theirs_ac, ours_ac, t, a, b))
        # the script's loss: F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        torch.testing.assert_close(ours.loss(pred, latents, noise, t), F.mse_loss(pred, want_target),
                                   rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_min_snr_matches_compute_snr_and_the_snr_gamma_weights(beta_schedule, prediction_type, gamma, seed):
    """train_text_to_image.py --snr_gamma: compute_snr, min(snr, gamma) / snr (epsilon) or
    / (snr + 1) (v_prediction) on the per-sample MSE, then the batch mean."""
    sched = ddpm(beta_schedule, prediction_type)
    latents, noise, t, pred = draws(seed)
    snr = compute_snr(sched, t)
    ours = DiffusersLoss(sched, strategy="min-snr", strategy_params={"gamma": gamma})
    # SNR = ac / (1 - ac): float32 1 - ac near ac = 1 has a relative error of about ULP1 / (1 - ac)
    ac = ours.schedule.alphas_cumprod[t].double()
    rel = (snr.double() / ours.schedule.snr[t].double() - 1).abs()
    bound = 1e-4 + 8 * ULP1 / (1 - ac)  # 1e-4: the cosine schedule's last α = 1 - 0.999 in float32
    assert torch.all(rel <= bound), rel
    capped = torch.minimum(snr, torch.full_like(snr, gamma))
    weights = capped / snr if prediction_type == "epsilon" else capped / (snr + 1)
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    want = (per_sample * weights).mean()
    torch.testing.assert_close(ours.loss(pred, latents, noise, t), want, rtol=1e-4, atol=1e-7)
    got = ours.loss(pred, latents, noise, t, reduction="none")
    assert torch.all((got - per_sample * weights).abs() <= bound.float() * (per_sample * weights) + 1e-7)


def test_min_snr_at_zero_terminal_snr_is_finite_where_the_script_divides_zero_by_zero():
    """With rescale_betas_zero_snr the last step has SNR = 0: the script's epsilon weight is 0/0 there
    (a NaN loss whenever t = T - 1 is drawn); ours is 1, the weight's limit (MinSNR docstring). The
    v form is 0 in both, and every other step agrees."""
    sched = ddpm("linear", "epsilon", zero_snr=True)
    latents, noise, t, pred = draws(3)
    snr = compute_snr(sched, t)
    script_w = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    assert torch.isnan(script_w[1]) and t[1] == 999
    ours = DiffusersLoss(sched, strategy="min-snr", strategy_params={"gamma": 5.0})
    per = ours.loss(pred, latents, noise, t, reduction="none")
    mse = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    assert torch.isfinite(per).all()
    torch.testing.assert_close(per[1], mse[1], rtol=1e-5, atol=0)  # weight 1
    torch.testing.assert_close(per[2:], (mse * script_w)[2:], rtol=1e-3, atol=1e-7)
    v = DiffusersLoss(ddpm("linear", "v_prediction", zero_snr=True), strategy="min-snr")
    assert float(v.loss(pred, latents, noise, t, reduction="none")[1]) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_sample_prediction_is_the_unconditional_scripts_snr_weighted_x0_loss(beta_schedule, seed):
    """train_unconditional.py --prediction_type sample: mean(SNR_t * (model_output - x0)^2), the ε
    objective on x0. Ours: an ε-defined weight of 1 carried to x0 (p2 with gamma 0); "uniform" is
    the plain x0 MSE."""
    sched = ddpm(beta_schedule, "sample")
    latents, noise, t, pred = draws(seed)
    t[1] = 990  # SNR_t > 0 (the cosine schedule's last step has SNR 2e-9)
    alpha_t = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = (alpha_t / (1 - alpha_t) * F.mse_loss(pred, latents, reduction="none")).mean()
    ours = DiffusersLoss(sched, strategy="p2", strategy_params={"gamma": 0.0})
    assert ours.prediction_type == "sample"
    # t = 0 dominates (SNR_0 ~ 1e4), and diffusers' float32 1 - ac there is good to about 6e-4
    torch.testing.assert_close(ours.loss(pred, latents, noise, t), want, rtol=2e-3, atol=1e-6)
    plain = DiffusersLoss(sched, strategy="uniform").loss(pred, latents, noise, t)
    torch.testing.assert_close(plain, F.mse_loss(pred, latents), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ SD3 / FLUX utilities
def script_sigmas(scheme, n, shift, seed, **kw):
    """The σ the SD3/FLUX scripts train on: compute_density_for_timestep_sampling, an index into the
    real FlowMatchEulerDiscreteScheduler's time steps, and that step's σ (float64 numpy)."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    args = {**SCRIPT_ARGS, **kw}
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=n,
                                              generator=torch.Generator().manual_seed(seed), **args)
    idx = (u * sched.config.num_train_timesteps).long().clamp(max=sched.config.num_train_timesteps - 1)
    timesteps = sched.timesteps[idx]
    return ds.get_sigmas_for(sched)(timesteps, n_dim=1).double().numpy()


def our_sigmas(strategy, n, seed):
    _, sigma = FlowMatchingLoss(strategy, seed=seed).noise(torch.zeros(n, 1))
    return sigma.double().numpy()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_sigma_draws_match_compute_density_for_timestep_sampling(scheme, shift, seed):
    """Two-sample KS on 20,000 draws each: the script's σ (snapped to the scheduler's grid, at most
    max(shift, 1/shift)/1000 from the continuous law) against ours. At n = m = 20,000 the test
    rejects a difference of about 0.02 in the CDFs at p = 1e-3; the mirror and shift errors below
    are rejected at p < 1e-12."""
    n = 20_000
    theirs = script_sigmas(scheme, n, shift, seed)
    ours = our_sigmas(fs.from_diffusers(scheme, shift=shift, **SCRIPT_ARGS), n, seed + 100)
    assert stats.ks_2samp(theirs, ours).pvalue > 1e-3


@pytest.mark.parametrize("wrong", ["unmirrored logit_mean", "shift ignored"])
def test_the_ks_check_rejects_a_wrong_law(wrong):
    n = 20_000
    if wrong == "unmirrored logit_mean":  # diffusers' logit_mean taken as our mean (it is -mean)
        theirs = script_sigmas("logit_normal", n, 1.0, 0)
        ours = our_sigmas(fs.get("logit_normal", mean=SCRIPT_ARGS["logit_mean"], std=1.0), n, 7)
    else:
        theirs = script_sigmas("logit_normal", n, 3.0, 0)
        ours = our_sigmas(fs.from_diffusers("logit_normal", **SCRIPT_ARGS), n, 7)
    assert stats.ks_2samp(theirs, ours).pvalue < 1e-12


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_flow_weights_match_compute_loss_weighting_for_sd3(scheme, backend):
    """The weighting as a formula (FlowMatchingLoss.weight) and inside the loss, on given σ."""
    g = torch.Generator().manual_seed(SCHEMES.index(scheme))
    sigmas = torch.cat([torch.linspace(0.01, 1.0, 100), torch.rand(156, generator=g) * 0.99 + 0.01])
    w_theirs = compute_loss_weighting_for_sd3(scheme, sigmas)
    flow = FlowMatchingLoss(fs.from_diffusers(scheme, **SCRIPT_ARGS), backend=backend, seed=5)
    np.testing.assert_allclose(flow.weight(sigmas.double().numpy()), w_theirs.double().numpy(), rtol=1e-6)
    # the script's loss: mean((w * (model_pred - (noise - x0))^2).reshape(B, -1), 1), per sample here
    B = sigmas.shape[0]
    x0 = torch.randn(B, 1, 4, 4, generator=g)
    pred = torch.randn(B, 1, 4, 4, generator=g)
    x_t, sig = flow.noise(x0, sigma=sigmas)
    noise = rng.normal_per_element(B, 16, torch.tensor(0), flow.k0, flow.k1).view(x0.shape)
    s4 = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - s4) * x0 + s4 * noise, rtol=1e-5, atol=1e-6)
    want = torch.mean((compute_loss_weighting_for_sd3(scheme, s4).float() * (pred - (noise - x0)) ** 2).reshape(B, -1), 1)
    torch.testing.assert_close(flow.loss(pred, x0, sig, reduction="none"), want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_scheduler_sigma_grid_is_our_shift(shift):
    """FlowMatchEulerDiscreteScheduler's training grid is our shift of k/1000, and its σ values are
    the quantiles k/1000 of our shifted uniform density; its inference grid (set_timesteps) is our
    shift too, of diffusers' own unshifted linspace(1, σ_min), which is not our sampler's
    linspace(1, 0) (flow_sigmas): the ends and the map agree, the points between do not."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    N = sched.config.num_train_timesteps
    k = np.arange(N, 0, -1) / N
    grid = fs.shift_sigma(k, shift)
    np.testing.assert_allclose(sched.sigmas.double().numpy(), grid, rtol=2e-6, atol=0)
    np.testing.assert_allclose(sched.timesteps.double().numpy(), grid * N, rtol=2e-6, atol=0)
    dens = FlowMatchingLoss("uniform", shift=shift).strategy.density
    np.testing.assert_allclose(1.0 - dens.cdf(sched.sigmas.double().numpy()), 1.0 - k, rtol=0, atol=2e-6)
    np.testing.assert_allclose(fs.unshift_sigma(sched.sigmas.double().numpy(), shift), k, rtol=2e-6)
    # inference: linspace(1, σ_min, n) in the unshifted σ (σ_min the shifted 1/N), shifted, then a 0
    n = 12
    sched.set_timesteps(n)
    inner = fs.shift_sigma(np.linspace(1.0, grid[-1], n), shift)
    np.testing.assert_allclose(sched.sigmas.double().numpy(), np.append(inner, 0.0), rtol=2e-6, atol=1e-7)
    ours = flow_sigmas(n, shift)
    assert ours[0] == float(sched.sigmas[0]) == 1.0 and ours[-1] == float(sched.sigmas[-1]) == 0.0
    np.testing.assert_allclose(fs.unshift_sigma(ours, shift), np.linspace(1.0, 0.0, n + 1), atol=1e-12)


# ------------------------------------------------------------------------------ the doc's diffs, run
class UNetLike:
    """A deterministic stand-in for the text-to-image scripts' UNet call signature."""

    def __call__(self, x, t, encoder_hidden_states, return_dict=False):
        return (0.5 * x + 0.1 * torch.cos(t.float() / 300).view(-1, 1, 1, 1) + encoder_hidden_states.mean(),)


class FromPretrained:
    """DDPMScheduler for `DDPMScheduler.from_pretrained(...)` without the hub: Stable Diffusion's config."""

    def __init__(self, prediction_type):
        self.prediction_type = prediction_type

    def from_pretrained(self, path, subfolder=None):
        assert subfolder == "scheduler"
        return ddpm("scaled_linear", self.prediction_type)


def uniform_edit(setup, step):
    return ds.replace_once(setup, 'strategy="speed"', 'strategy="uniform"'), step


def run_both(diff, seed, t, names, edit=uniform_edit):
    """The doc's "-" program and "+" program (edited) on the same noise and time steps."""
    fixed = ds.FixedDraws(t)
    after = ds.StepRunner(diff, "after", names.pop("model", None), edit=edit, **names)
    before = ds.StepRunner(diff, "before", after.ns["model"], **names)
    before.ns["torch"] = fixed
    torch.manual_seed(seed)
    b = dict(before.step())
    after.ns["speed"].sample_timesteps = lambda bsz, device: t.clone()  # the same t on our side
    torch.manual_seed(seed)
    a = dict(after.step())
    return before, after, b, a, fixed


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_text_to_image_diff_of_the_doc_runs_on_a_real_ddpm_scheduler(prediction_type, seed):
    diff = ds.doc_diff(ds.TEXT_TO_IMAGE)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    names = dict(DDPMScheduler=FromPretrained(prediction_type), unet=UNetLike(),
                 encoder_hidden_states=torch.randn(6, 7, 16, generator=g), latents=latents,
                 args=type("Args", (), {"pretrained_model_name_or_path": "stable-diffusion"}))
    before, after, b, a, fixed = run_both(diff, seed, t, names)
    assert len(fixed.randint_calls) == 1  # the script drew its t once, uniformly over the schedule
    torch.testing.assert_close(a["noise"], b["noise"], rtol=0, atol=0)
    torch.testing.assert_close(a["noisy_latents"], b["noisy_latents"], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=2e-5, atol=1e-7)
    # the doc's "+" lines as written (strategy="speed"): the script's per-sample MSE times SpeeD's weight
    speed = ds.StepRunner(diff, "after", None, **names)
    speed.ns["speed"].sample_timesteps = lambda bsz, device: t.clone()
    torch.manual_seed(seed)
    s = speed.step()
    w = speed.ns["speed"].loss_fn.tables("cpu")[ROW_WEIGHT][t]
    assert not torch.allclose(w, torch.ones_like(w))
    per = F.mse_loss(b["model_pred"], b["target"], reduction="none").mean(dim=(1, 2, 3))
    torch.testing.assert_close(s["loss"], (w * per).mean(), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_sd3_diff_of_the_doc_runs_with_the_real_training_utils(scheme, shift):
    """Both sides of the flow diff on the real compute_density_for_timestep_sampling /
    compute_loss_weighting_for_sd3 / FlowMatchEulerDiscreteScheduler: the script's side runs and
    trains on the scheduler's grid; ours gives the script's loss formula at our σ."""
    diff = ds.doc_diff(ds.SD3)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    g = torch.Generator().manual_seed(int(shift * 10) + SCHEMES.index(scheme))
    model_input = torch.randn(8, 4, 4, 4, generator=g)
    args = type("Args", (), {"weighting_scheme": scheme, "seed": 3, **SCRIPT_ARGS})

    def transformer(hidden_states, timestep, return_dict=False):
        return (0.7 * hidden_states - 0.2 + timestep.float().view(-1, 1, 1, 1) / 2000,)

    names = dict(args=args, noise_scheduler_copy=sched, transformer=transformer, model_input=model_input,
                 get_sigmas=ds.get_sigmas_for(sched))
    torch.manual_seed(0)
    b = ds.StepRunner(diff, "before", None, **names).step()
    grid = sched.sigmas.double()
    assert torch.isfinite(b["loss"]) and torch.isin(b["sigmas"].flatten().double(), grid).all()
    a = ds.StepRunner(diff, "after", None, **names).step()
    sig = a["sigmas"]
    assert sig.shape == (8,) and sig.dtype == torch.float32
    torch.testing.assert_close(a["timesteps"], sig * 1000)
    flow = a["flow"]
    noise = rng.normal_per_element(8, 64, torch.tensor(0), flow.k0, flow.k1).view(model_input.shape)
    s4 = sig.view(-1, 1, 1, 1)
    torch.testing.assert_close(a["noisy_model_input"], (1 - s4) * model_input + s4 * noise, rtol=1e-5, atol=1e-6)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=s4)
    target = noise - model_input
    want = torch.mean((weighting.float() * (a["model_pred"] - target) ** 2).reshape(8, -1), 1).mean()
    torch.testing.assert_close(a["loss"], want, rtol=2e-5, atol=1e-7)


def test_unconditional_diff_of_the_doc_gives_the_scripts_loss_on_a_unet2dmodel():
    """train_unconditional.py's step, "-" side and "+" side (strategy "uniform"), on diffusers'
    UNet2DModel and a batch of digits: the same noise, t, noisy images and loss (to rounding)."""
    diff = ds.doc_diff(ds.UNCONDITIONAL)
    data = ds.digits()
    model = ds.tiny_unet(0)
    g = torch.Generator().manual_seed(4)
    batch = {"input": data[torch.randint(0, data.shape[0], (16,), generator=g)]}
    t = torch.randint(0, 1000, (16,), generator=g)
    names = dict(model=model, args=ds.unconditional_args(), batch=batch)
    before, after, b, a, fixed = run_both(diff, 11, t, names)
    (args_, kw), = fixed.randint_calls
    assert args_[:3] == (0, 1000, (16,))
    assert isinstance(after.ns["noise_scheduler"], DDPMScheduler)
    torch.testing.assert_close(a["noise"], b["noise"], rtol=0, atol=0)
    torch.testing.assert_close(a["noisy_images"], b["noisy_images"], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-7)
    assert after.ns["speed"].strategy.name == "uniform"


@pytest.mark.slow
def test_unet2dmodel_trained_through_the_doc_diff_with_speed_samples_digits_with_ddim():
    """The doc's "+" program as written (SpeeD) trains diffusers' UNet2DModel on the digits for 150
    CPU steps; the loss falls; DDIMPipeline with a DDIMScheduler from the training config samples it,
    and the samples are finite, in range and nearer the digits than noise is."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        diff = ds.doc_diff(ds.UNCONDITIONAL)
        data = ds.digits()
        model = ds.tiny_unet(0)
        runner = ds.StepRunner(diff, "after", model, args=ds.unconditional_args())
        sched = runner.ns["noise_scheduler"]
        assert runner.ns["speed"].strategy.name == "speed"  # the doc's code as written
        before = ds.eval_loss(model, sched, data)
        losses = ds.train(runner, data, steps=150, batch_size=64, lr=3e-3, seed=0)
        after = ds.eval_loss(model, sched, data)
        assert np.isfinite(losses).all()
        assert np.mean(losses[-25:]) < 0.7 * np.mean(losses[:25]), (losses[:25], losses[-25:])
        assert after < 0.5 * before, (before, after)  # the script's own uniform ε loss, fixed batch
        samples = ds.ddim_samples(model, sched, n=64, steps=50, seed=0)
        assert samples.shape == (64, 1, 8, 8) and torch.isfinite(samples).all()
        assert samples.min() >= -1 and samples.max() <= 1
        noise = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
        d_samples, d_noise = ds.nearest_data_distance(samples, data), ds.nearest_data_distance(noise, data)
        assert d_samples < 0.75 * d_noise, (d_samples, d_noise)
        assert ds.mean_image_correlation(samples, data) > 0.4  # 0.70 measured; noise: 0.10
        assert abs(ds.mean_image_correlation(noise, data)) < 0.5
    finally:
        torch.set_num_threads(torch_threads)
