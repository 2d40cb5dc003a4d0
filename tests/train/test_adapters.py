"""Each adapter against the semantics of the call it replaces: same t and noise in, same loss out.

The DiT reference below is written from guided-diffusion's formulas (float64 numpy schedule
arrays, coefficients gathered per t and cast to float32, as DiT's _extract_into_tensor does)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speed_kernels import NoiseSchedule
from speed_train.adapters import DiffusersLoss, SpeeDDiffusion, create_speed_diffusion


# ------------------------------------------------------------------------------ DiT reference
def _dit_linear_betas(T):
    scale = 1000 / T
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)


class RefGaussianDiffusion:
    """Independent transcription of DiT's training_losses for EPSILON / LEARNED_RANGE / MSE."""

    def __init__(self, betas, learn_sigma):
        self.learn_sigma = learn_sigma
        self.betas = betas
        alphas = 1.0 - betas
        self.ac = np.cumprod(alphas)
        self.ac_prev = np.append(1.0, self.ac[:-1])
        self.sqrt_ac = np.sqrt(self.ac)
        self.sqrt_1m_ac = np.sqrt(1.0 - self.ac)
        self.sqrt_recip_ac = np.sqrt(1.0 / self.ac)
        self.sqrt_recipm1_ac = np.sqrt(1.0 / self.ac - 1)
        self.post_var = betas * (1.0 - self.ac_prev) / (1.0 - self.ac)
        self.post_logvar_clipped = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.post_c1 = betas * np.sqrt(self.ac_prev) / (1.0 - self.ac)
        self.post_c2 = (1.0 - self.ac_prev) * np.sqrt(alphas) / (1.0 - self.ac)

    @staticmethod
    def _ex(arr, t, like):
        v = torch.from_numpy(arr)[t].float()
        return v.view(-1, *([1] * (like.dim() - 1))).expand(like.shape)

    def q_sample(self, x0, t, noise):
        return self._ex(self.sqrt_ac, t, x0) * x0 + self._ex(self.sqrt_1m_ac, t, x0) * noise

    def q_posterior(self, x0, xt, t):
        mean = self._ex(self.post_c1, t, xt) * x0 + self._ex(self.post_c2, t, xt) * xt
        return mean, self._ex(self.post_logvar_clipped, t, xt)

    @staticmethod
    def normal_kl(m1, lv1, m2, lv2):
        return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))

    @staticmethod
    def approx_cdf(x):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    def disc_gauss_ll(self, x, means, log_scales):
        c = x - means
        inv = torch.exp(-log_scales)
        cdf_plus = self.approx_cdf(inv * (c + 1.0 / 255.0))
        cdf_min = self.approx_cdf(inv * (c - 1.0 / 255.0))
        log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
        log_1m_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
        delta = cdf_plus - cdf_min
        return torch.where(
            x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_1m_cdf_min, torch.log(delta.clamp(min=1e-12)))
        )

    def training_losses(self, model, x0, t, model_kwargs, noise):
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, **model_kwargs)
        terms = {}
        C = x0.shape[1]
        mean_dims = list(range(1, x0.dim()))
        if self.learn_sigma:
            eps_pred, var_values = out[:, :C], out[:, C:]
            frozen = eps_pred.detach()
            # p_mean_variance with LEARNED_RANGE, clip_denoised=False
            min_log = self._ex(self.post_logvar_clipped, t, xt)
            max_log = self._ex(np.log(self.betas), t, xt)
            frac = (var_values + 1) / 2
            model_logvar = frac * max_log + (1 - frac) * min_log
            pred_x0 = self._ex(self.sqrt_recip_ac, t, xt) * xt - self._ex(self.sqrt_recipm1_ac, t, xt) * frozen
            model_mean, _ = self.q_posterior(pred_x0, xt, t)
            true_mean, true_logvar = self.q_posterior(x0, xt, t)
            kl = self.normal_kl(true_mean, true_logvar, model_mean, model_logvar).mean(mean_dims) / math.log(2.0)
            nll = -self.disc_gauss_ll(x0, model_mean, 0.5 * model_logvar).mean(mean_dims) / math.log(2.0)
            terms["vb"] = torch.where(t == 0, nll, kl)
        else:
            eps_pred = out
        terms["mse"] = ((noise - eps_pred) ** 2).mean(mean_dims)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


class TinyDiTLike(torch.nn.Module):
    """Any function of (x_t, t, y) with 2C (or C) output channels, differentiable."""

    def __init__(self, C, learn_sigma):
        super().__init__()
        self.out_c = 2 * C if learn_sigma else C
        self.conv = torch.nn.Conv2d(C, self.out_c, 3, padding=1)
        self.emb = torch.nn.Embedding(10, self.out_c)

    def forward(self, x, t, y):
        h = self.conv(x) + self.emb(y)[:, :, None, None] + (t.float() / 1000.0)[:, None, None, None]
        if self.out_c != x.shape[1]:
            eps, v = h.chunk(2, dim=1)
            return torch.cat([eps, torch.tanh(v)], dim=1)  # variance values in [-1, 1] as DiT's range
        return h


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    B, C = 8, 4
    x0 = torch.rand(B, C, 6, 6, generator=g) * 2 - 1
    x0[0, 0, 0, 0] = -1.0  # exercise both edge branches of the decoder likelihood
    x0[0, 0, 0, 1] = 1.0
    noise = torch.randn(B, C, 6, 6, generator=g)
    t = torch.tensor([0, 0, 1, 5, 250, 640, 701, 999])
    y = torch.randint(0, 10, (B,), generator=g)
    return x0, noise, t, y


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dit_adapter_equals_dit_training_losses_for_uniform(batch, learn_sigma):
    x0, noise, t, y = batch
    torch.manual_seed(0)
    model = TinyDiTLike(x0.shape[1], learn_sigma)
    ref = RefGaussianDiffusion(_dit_linear_betas(1000), learn_sigma)
    want = ref.training_losses(model, x0, t, dict(y=y), noise)
    diffusion = create_speed_diffusion(timestep_respacing="", learn_sigma=learn_sigma, strategy="uniform", backend="torch")
    assert isinstance(diffusion, SpeeDDiffusion) and diffusion.num_timesteps == 1000
    got = diffusion.training_losses(model, x0, t, dict(y=y), noise=noise)
    keys = {"loss", "mse", "vb"} if learn_sigma else {"loss", "mse"}
    assert keys <= set(got)
    for k in keys:
        assert got[k].shape == (x0.shape[0],)
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=2e-5, atol=2e-6, msg=k)
    # gradients to the model agree too (the VLB term trains only the variance channels)
    model.zero_grad()
    want["loss"].mean().backward()
    g_want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    diffusion.training_losses(model, x0, t, dict(y=y), noise=noise)["loss"].mean().backward()
    for a, b in zip([p.grad for p in model.parameters()], g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dit_adapter_weights_only_the_mse_term_for_speed(batch):
    x0, noise, t, y = batch
    torch.manual_seed(0)
    model = TinyDiTLike(x0.shape[1], True)
    ref = RefGaussianDiffusion(_dit_linear_betas(1000), True).training_losses(model, x0, t, dict(y=y), noise)
    d = create_speed_diffusion(strategy="speed", strategy_params={"k": 5, "lam": 0.6}, backend="torch")
    got = d.training_losses(model, x0, t, dict(y=y), noise=noise)
    w = d.loss_fn.weights_table[t].float()
    # SpeeD code variant: w in [0.407, 0.600] below tau = 700, 1 from tau on
    assert (w[t < 700] < 0.61).all() and (w[t >= 700] == 1).all()
    torch.testing.assert_close(got["weight"].float(), w)
    torch.testing.assert_close(got["mse"], w * ref["mse"], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(got["vb"], ref["vb"], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(got["loss"], w * ref["mse"] + ref["vb"], rtol=2e-5, atol=2e-6)


def _backend_or_skip(backend):
    from speed_kernels.backends import _LOAD_ERRORS, _try_load

    from required import missing

    if _try_load(backend) is None:
        missing(f"the {backend} backend", _LOAD_ERRORS.get(backend))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_dit_adapter_internal_noise_is_consistent_and_resumable(backend):
    """noise=None: eps from the loss object's stream; the loss regenerates the same eps as x_t used
    (cpp: the compiled kernels draw and regenerate it)."""
    _backend_or_skip(backend)
    d = create_speed_diffusion(strategy="uniform", learn_sigma=False, backend=backend, seed=3)
    x0 = torch.rand(4, 2, 4, 4) * 2 - 1
    t = d.sample_timesteps(4, "cpu")
    seen = {}

    def model(x_t, tt):
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    out = d.training_losses(model, x0, t)
    ac = torch.from_numpy(d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
    eps = (seen["x_t"] - ac.sqrt() * x0) / (1 - ac).sqrt()
    # zero prediction: the eps-MSE is mean(eps^2) of the very eps that made x_t
    torch.testing.assert_close(out["mse"], (eps**2).mean((1, 2, 3)), rtol=1e-4, atol=1e-5)
    state = d.state_dict()
    t_next = d.sample_timesteps(64, "cpu")
    d2 = create_speed_diffusion(strategy="uniform", learn_sigma=False, backend=backend, seed=99)
    d2.load_state_dict(state)
    assert torch.equal(d2.sample_timesteps(64, "cpu"), t_next)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dit_adapter_on_the_cpp_backend_equals_the_torch_backend(batch, learn_sigma):
    """The adapter through a compiled kernel backend: the same losses and model gradients as
    through the plain-PyTorch one, with the adapter's own eps (noise=None) and with given noise."""
    _backend_or_skip("cpp")
    x0, noise, t, y = batch
    out = {}
    for backend in ("torch", "cpp"):
        torch.manual_seed(0)
        model = TinyDiTLike(x0.shape[1], learn_sigma)
        d = create_speed_diffusion(strategy="speed", learn_sigma=learn_sigma, backend=backend, seed=21)
        assert d.loss_fn.backend(x0.device).name == backend
        own = d.training_losses(model, x0, t, dict(y=y))
        given = d.training_losses(model, x0, t, dict(y=y), noise=noise)
        (own["loss"].mean() + given["loss"].mean()).backward()
        out[backend] = (own, given, [p.grad.clone() for p in model.parameters()])
    for k in out["torch"][0]:
        torch.testing.assert_close(out["cpp"][0][k], out["torch"][0][k], rtol=2e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(out["cpp"][1][k], out["torch"][1][k], rtol=2e-5, atol=1e-6, msg=k)
    for a, b in zip(out["cpp"][2], out["torch"][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _official_speed_fraction_below_tau(n, k=5, tau=700, T=1000, pivot=642):
    """P(t < tau) per draw under the official SpeeD sampler, from its definition (not from the
    library): p(t) = k for t < tau, 1 after, normalised; the first n//2 + 1 steps are drawn, the
    rest are |t - pivot| of the first ones (pivot 642 on the linear schedule). Returns the drawn
    half's probability, the mirrored half's, and n_draw."""
    p_low = k * tau / (k * tau + (T - tau))
    ts = torch.arange(T, dtype=torch.float64)
    probs = torch.where(ts < tau, torch.tensor(float(k), dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    probs /= probs.sum()
    p_mirror = probs[(ts - pivot).abs() < tau].sum().item()
    return p_low, p_mirror, n // 2 + 1


def _assert_speed_draw(t, n):
    """The exact fraction below tau within 4.5 binomial standard deviations, per half and in all:
    k = 4 (0.9032 drawn) or a lost mirror (0.921 in all) is > 10 sd away at n = 2^16."""
    p_low, p_mirror, n_draw = _official_speed_fraction_below_tau(n)
    drawn, mirrored = t[:n_draw], t[n_draw:]
    sd = math.sqrt(p_low * (1 - p_low) / n_draw)
    frac = (drawn < 700).double().mean().item()
    assert abs(frac - p_low) < 4.5 * sd, f"drawn half: {frac:.5f} below tau, expected {p_low:.5f} +- {4.5 * sd:.5f}"
    assert torch.equal(mirrored, (drawn[: n - n_draw] - 642).abs()), "the second half is not the mirror |t - 642|"
    want = (n_draw * p_low + (n - n_draw) * p_mirror) / n
    sd_all = math.sqrt(n_draw * p_low * (1 - p_low)) / n  # the mirrored half is a function of the drawn one
    got = (t < 700).double().mean().item()
    assert abs(got - want) < 4.5 * sd_all + 1.0 / n, f"{got:.5f} below tau, expected {want:.5f} (0.9605 for k=5)"


def test_dit_sample_timesteps_follow_the_strategy():
    d = create_speed_diffusion(strategy="speed", backend="torch", seed=0)
    t = d.sample_timesteps(4096, "cpu")
    assert t.dtype == torch.int64 and t.shape == (4096,)
    assert 0 <= int(t.min()) and int(t.max()) < 1000
    # official SpeeD (k=5, tau=700, mirrored half batch): 96.05% of steps below tau, vs 70% uniform
    assert (t < 700).float().mean() > 0.9
    n = 1 << 16
    _assert_speed_draw(d.sample_timesteps(n, "cpu"), n)
    step = d.loss_fn.step
    d.training_losses(lambda x, tt: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:]), torch.zeros(2, 1, 2, 2), t[:2])
    assert d.loss_fn.step == step  # only sample_timesteps advances the strategy's step


def test_create_speed_diffusion_rejects_what_it_does_not_do():
    with pytest.raises(ValueError, match="create_diffusion"):
        create_speed_diffusion(timestep_respacing="250")
    with pytest.raises(ValueError, match="use_kl"):
        create_speed_diffusion(use_kl=True)
    with pytest.raises(ValueError, match="noise_schedule"):
        create_speed_diffusion(noise_schedule="sigmoid")
    with pytest.raises(ValueError, match="unknown strategy"):
        create_speed_diffusion(strategy="nope")
    d = create_speed_diffusion(diffusion_steps=500, learn_sigma=False, strategy="uniform")
    np.testing.assert_allclose(d.betas, _dit_linear_betas(500))
    with pytest.raises(ValueError, match="2C channels"):
        create_speed_diffusion(backend="torch").training_losses(
            lambda x, t: x, torch.zeros(2, 1, 2, 2), torch.tensor([1, 2])
        )


# ------------------------------------------------------------------------------ diffusers
def _diffusers_reference(config, latents, noise, timesteps, prediction_type):
    """add_noise / get_velocity / F.mse_loss as diffusers' DDPMScheduler and train scripts do."""
    T = config["num_train_timesteps"]
    if config["beta_schedule"] == "linear":
        betas = torch.linspace(config["beta_start"], config["beta_end"], T, dtype=torch.float32)
    elif config["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    sa = ac[timesteps].sqrt().view(-1, 1, 1, 1)
    s1 = (1 - ac[timesteps]).sqrt().view(-1, 1, 1, 1)
    noisy = sa * latents + s1 * noise
    target = noise if prediction_type == "epsilon" else sa * noise - s1 * latents
    return noisy, target


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_diffusers_helper_equals_add_noise_and_mse_for_uniform(prediction_type, beta_schedule):
    config = {
        "num_train_timesteps": 1000,
        "beta_schedule": beta_schedule,
        "beta_start": 0.00085 if beta_schedule == "scaled_linear" else 1e-4,
        "beta_end": 0.012 if beta_schedule == "scaled_linear" else 0.02,
        "prediction_type": prediction_type,
    }
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    timesteps = torch.randint(0, 1000, (6,), generator=g)
    pred = torch.randn(6, 4, 8, 8, generator=g, requires_grad=True)
    helper = DiffusersLoss(config, strategy="uniform", backend="torch")  # prediction_type from the config
    assert helper.prediction_type == prediction_type
    noisy_want, target = _diffusers_reference(config, latents, noise, timesteps, prediction_type)
    noisy = helper.add_noise(latents, noise, timesteps)
    # diffusers computes betas in float32, the core in float64: agreement to float32 rounding
    torch.testing.assert_close(noisy, noisy_want, rtol=1e-5, atol=1e-5)
    loss = helper.loss(pred, latents, noise, timesteps)
    want = F.mse_loss(pred.float(), target.float(), reduction="mean")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(loss, pred)
    (g2,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_diffusers_helper_min_snr_matches_the_scripts_min_snr_variant():
    """diffusers' train_text_to_image --snr_gamma 5 for epsilon: per-sample MSE * min(SNR, 5) / SNR, then mean."""
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    g = torch.Generator().manual_seed(2)
    latents, noise = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    pred = torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 100, 500, 999])
    helper = DiffusersLoss(config, strategy="min-snr", strategy_params={"gamma": 5.0}, backend="torch")
    ac = NoiseSchedule.from_diffusers(config).alphas_cumprod[t]
    snr = (ac / (1 - ac)).float()
    w = torch.clamp(snr, max=5.0) / snr
    want = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * w).mean()
    torch.testing.assert_close(helper.loss(pred, latents, noise, t), want, rtol=1e-5, atol=1e-6)


def test_diffusers_helper_sampling_and_errors():
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    helper = DiffusersLoss(config, strategy="speed", seed=0)
    assert helper.prediction_type == "epsilon" and helper.num_train_timesteps == 1000
    t = helper.sample_timesteps(2048, "cpu")
    assert t.shape == (2048,) and (t < 700).float().mean() > 0.9
    n = 1 << 16
    _assert_speed_draw(helper.sample_timesteps(n, "cpu"), n)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersLoss(config, prediction_type="flow")
    with pytest.raises(ValueError, match="beta_schedule"):
        DiffusersLoss({"beta_schedule": "sigmoid"})

    class FakeScheduler:  # anything with .config works (a diffusers scheduler does)
        config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}

    assert DiffusersLoss(FakeScheduler(), strategy="uniform").prediction_type == "v_prediction"


def test_dit_adapter_predict_xstart_uniform_is_plain_x0_mse(batch):
    x0, noise, t, y = batch
    d = create_speed_diffusion(strategy="uniform", learn_sigma=False, predict_xstart=True, backend="torch")
    pred = {}

    def model(x_t, tt, y):
        pred["p"] = x_t * 0.5
        return pred["p"]

    got = d.training_losses(model, x0, t, dict(y=y), noise=noise)
    torch.testing.assert_close(got["loss"], ((x0 - pred["p"]) ** 2).mean((1, 2, 3)), rtol=1e-5, atol=1e-6)
