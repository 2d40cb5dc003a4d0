"""Flow-matching densities and weightings against independent formulas.

The diffusers oracle below re-implements, from shared/FLOW.md, what diffusers' SD3/FLUX training
scripts do (compute_density_for_timestep_sampling, the descending-timestep lookup sigma ~ 1 - u,
compute_loss_weighting_for_sd3 and the scheduler shift): the `diffusers` package is not installed
here (no network), so its own functions could not be called."""
import math

import numpy as np
import pytest
from scipy import integrate, stats

from speed_kernels import flow_strategies as F

ALL_DENSITIES = ["uniform", "logit_normal", "mode", "cosmap", "laplace", "edm_lognormal", "beta", "speed"]
N = 40000


# ----------------------------------------------------------------------------- diffusers oracle
def diffusers_density_sample(scheme, batch, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, rng=None):
    """compute_density_for_timestep_sampling: a sample u in (0, 1)."""
    if scheme == "logit_normal":
        return 1.0 / (1.0 + np.exp(-rng.normal(logit_mean, logit_std, size=batch)))
    if scheme == "mode":
        u = rng.uniform(size=batch)
        return 1.0 - u - mode_scale * (np.cos(math.pi * u / 2) ** 2 - 1 + u)
    return rng.uniform(size=batch)


def diffusers_sigma(u, shift=1.0):
    """The scripts' sigma for a u at continuous resolution: descending sigmas, sigma = 1 - u,
    then the scheduler's shift s sigma / (1 + (s - 1) sigma)."""
    s = 1.0 - u
    return shift * s / (1 + (shift - 1) * s)


def diffusers_weight(scheme, sigmas):
    """compute_loss_weighting_for_sd3."""
    if scheme == "sigma_sqrt":
        return sigmas ** -2.0
    if scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas ** 2
        return 2 / (math.pi * bot)
    return np.ones_like(sigmas)


@pytest.mark.parametrize("scheme,kw", [
    ("logit_normal", dict(logit_mean=0.0, logit_std=1.0)),
    ("logit_normal", dict(logit_mean=0.7, logit_std=0.8)),  # asymmetric: catches a missing mirror
    ("mode", dict(mode_scale=1.29)),
    ("mode", dict(mode_scale=-0.5)),
    ("none", {}),
    ("cosmap", {}),
    ("sigma_sqrt", {}),
])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_from_diffusers_matches_the_scripts(scheme, kw, shift):
    rng = np.random.default_rng(1)
    sig = diffusers_sigma(diffusers_density_sample(scheme, N, rng=rng, **kw), shift)
    ours = F.from_diffusers(scheme, shift=shift, **kw)
    assert stats.kstest(sig, ours.cdf).pvalue > 1e-3
    grid = np.linspace(0.01, 0.99, 97)
    np.testing.assert_allclose(ours.weight(grid, "v"), diffusers_weight(scheme, grid), rtol=1e-12)


def test_logit_normal_mean_sign_is_the_sd3_papers():
    # logit(sigma) ~ N(mean, std): mean > 0 puts more mass near noise (sigma -> 1)
    d = F.get("logit_normal", mean=1.0).density
    assert d.cdf(0.5) == pytest.approx(stats.norm.cdf(-1.0), abs=1e-12)


# ----------------------------------------------------------------------------- each density
def _samples(name, rng):
    """Draws from the published definitions, written here independently of the library."""
    u = rng.uniform(size=N)
    if name == "uniform":
        return u
    if name == "logit_normal":
        return 1 / (1 + np.exp(-rng.normal(0.3, 1.2, size=N)))
    if name == "mode":  # SD3: t = f_mode(u) is the noise level
        return 1.0 - u - 0.8 * (np.cos(math.pi * u / 2) ** 2 - 1 + u)
    if name == "cosmap":  # SD3: t = 1 - 1 / (tan(pi u / 2) + 1)
        return 1 - 1 / (np.tan(math.pi * u / 2) + 1)
    if name == "laplace":  # Hang et al., then lambda = log-SNR = 2 ln((1 - s) / s)
        lam = 0.2 - 0.7 * np.sign(0.5 - u) * np.log(1 - 2 * np.abs(u - 0.5))
        return 1 / (1 + np.exp(lam / 2))
    if name == "edm_lognormal":  # ln sigma_edm ~ N, equal SNR: sigma = sigma_edm / (1 + sigma_edm)
        se = np.exp(rng.normal(-0.4, 1.0, size=N))
        return se / (1 + se)
    if name == "beta":
        return rng.beta(0.8, 1.5, size=N)
    if name == "speed":  # mixture: mass k tau / Z uniform on [0, tau), the rest uniform on [tau, 1]
        k, tau = 5.0, 0.9
        z = k * tau + 1 - tau
        low = rng.uniform(size=N) < k * tau / z
        return np.where(low, rng.uniform(0, tau, size=N), rng.uniform(tau, 1, size=N))
    raise AssertionError(name)


PARAMS = {
    "uniform": {}, "logit_normal": dict(mean=0.3, std=1.2), "mode": dict(scale=0.8), "cosmap": {},
    "laplace": dict(mu=0.2, b=0.7), "edm_lognormal": dict(p_mean=-0.4, p_std=1.0), "beta": dict(a=0.8, b=1.5),
    "speed": dict(k=5.0, tau=0.9),
}


@pytest.mark.parametrize("name", ALL_DENSITIES)
def test_cdf_against_published_sampler(name):
    rng = np.random.default_rng(7)
    strat = F.get(name, **PARAMS[name])
    assert stats.kstest(_samples(name, rng), strat.cdf).pvalue > 1e-3


@pytest.mark.parametrize("name", ALL_DENSITIES)
@pytest.mark.parametrize("shift,clamp", [(1.0, None), (3.0, None), (0.5, (0.05, 0.9))])
def test_pdf_cdf_icdf_consistent(name, shift, clamp):
    d = F.get(name, shift=shift, clamp=clamp, **PARAMS[name]).density
    u = np.linspace(0.002, 0.998, 301)
    np.testing.assert_allclose(d.cdf(d.icdf(u)), u, atol=1e-9)
    a, b = 0.1, 0.85
    # kinks: SpeeD's step at tau, Laplace's peak at mu (both moved by the shift)
    kinks = [float(F.shift_sigma(0.9, shift)), float(F.shift_sigma(1 / (1 + math.exp(0.1)), shift))]
    area, _ = integrate.quad(lambda x: float(d.pdf(np.array([x]))[0]), a, b, points=kinks, limit=200)
    assert area == pytest.approx(float(d.cdf(b) - d.cdf(a)), abs=1e-8)
    assert float(d.cdf(0.0 if clamp is None else clamp[0])) == pytest.approx(0.0, abs=1e-12)
    assert float(d.cdf(1.0)) == pytest.approx(1.0, abs=1e-12)


def test_shift_and_clamp_against_transformed_samples():
    rng = np.random.default_rng(3)
    base = 1 / (1 + np.exp(-rng.normal(0.0, 1.0, size=4 * N)))
    shifted = 3.0 * base / (1 + 2.0 * base)
    kept = shifted[(shifted >= 0.2) & (shifted <= 0.95)]  # truncation = rejection
    strat = F.get("logit_normal", shift=3.0, clamp=(0.2, 0.95))
    assert stats.kstest(kept, strat.cdf).pvalue > 1e-3
    assert strat.icdf(np.array([0.0]))[0] == pytest.approx(0.2, abs=1e-9)
    assert strat.icdf(np.array([1.0]))[0] == pytest.approx(0.95, abs=1e-9)


# ----------------------------------------------------------------------------- weightings
def _pair(rng, n=64):
    sigma = rng.uniform(0.02, 0.98, size=(n, 1))
    x0, eps = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
    x_t = (1 - sigma) * x0 + sigma * eps
    v_hat = (eps - x0) + 0.3 * rng.normal(size=(n, 16))
    return sigma[:, 0], x0, eps, x_t, v_hat


def test_min_snr_is_one_objective_across_targets():
    rng = np.random.default_rng(0)
    sigma, x0, eps, x_t, v_hat = _pair(rng)
    s = sigma[:, None]
    x0_hat = x_t - s * v_hat  # the x0 and eps the velocity implies at this x_t
    eps_hat = x_t + (1 - s) * v_hat
    gamma = 5.0
    snr = ((1 - sigma) / sigma) ** 2
    published = np.minimum(snr, gamma) * ((x0_hat - x0) ** 2).sum(1)  # Hang et al. on x0
    w = F.get("min_snr", gamma=gamma).weighting
    np.testing.assert_allclose(w.weight(sigma, "v") * ((v_hat - (eps - x0)) ** 2).sum(1), published, rtol=1e-9)
    np.testing.assert_allclose(w.weight(sigma, "x0") * ((x0_hat - x0) ** 2).sum(1), published, rtol=1e-9)
    np.testing.assert_allclose(w.weight(sigma, "eps") * ((eps_hat - eps) ** 2).sum(1), published, rtol=1e-9)
    assert w.weight(np.array([1.0]), "eps")[0] == 1.0  # SNR = 0 guard


def test_p2_is_one_objective_across_targets():
    rng = np.random.default_rng(1)
    sigma, x0, eps, x_t, v_hat = _pair(rng)
    s = sigma[:, None]
    x0_hat, eps_hat = x_t - s * v_hat, x_t + (1 - s) * v_hat
    k, gamma = 1.0, 0.5
    snr = ((1 - sigma) / sigma) ** 2
    published = ((eps_hat - eps) ** 2).sum(1) / (k + snr) ** gamma  # Choi et al. on eps
    w = F.get("p2", k=k, gamma=gamma).weighting
    np.testing.assert_allclose(w.weight(sigma, "v") * ((v_hat - (eps - x0)) ** 2).sum(1), published, rtol=1e-9)
    np.testing.assert_allclose(w.weight(sigma, "x0") * ((x0_hat - x0) ** 2).sum(1), published, rtol=1e-9)
    np.testing.assert_allclose(w.weight(sigma, "eps") * ((eps_hat - eps) ** 2).sum(1), published, rtol=1e-9)


# ----------------------------------------------------------------------------- SpeeD for flow
@pytest.mark.parametrize("d", [1.0, 0.5])
def test_speed_increment_is_the_derivative_of_the_unit_variance_noise_level(d):
    s = np.linspace(0.001, 0.999, 999)
    level = lambda x: x / np.sqrt((1 - x) ** 2 * d * d + x * x)  # noqa: E731
    h = 1e-6
    numeric = (level(s + h) - level(s - h)) / (2 * h)
    np.testing.assert_allclose(F.speed_increment(s, d), numeric, rtol=1e-6, atol=1e-9)


def test_speed_tau_and_weights():
    tau = F.speed_tau()
    g = F.speed_increment(np.linspace(0, 1, 100001))
    rel = 5e-5 / np.gradient(np.sqrt(1 - np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))).max()
    assert 0.9 < tau < 1.0
    assert F.speed_increment(tau) < rel * g.max() <= F.speed_increment(tau - 1e-3)
    strat = F.get("speed", lam=0.6, k=5)
    assert strat.density.tau == tau and strat.weighting.tau == tau
    s = np.linspace(0, 1, 1001)
    w = strat.weight(s)
    below = s < tau
    assert np.all(w[~below] == 1.0)
    assert w[below].min() >= 0.4 - 1e-12 and w[below].max() <= 0.6 + 1e-12
    assert strat.pdf(np.array([0.5]))[0] == pytest.approx(5 * strat.pdf(np.array([0.995]))[0])


# ----------------------------------------------------------------------------- registry / errors
def test_registry_pairs_and_errors():
    s = F.get("beta+p2", a=0.5, b=2.0, k=2.0, gamma=0.5)
    assert s.density.params == {"a": 0.5, "b": 2.0} and s.weighting.params == {"k": 2.0, "gamma": 0.5}
    assert F.get("min_snr").density.name == "uniform"
    assert F.get("logit-normal+min-snr").weighting.name == "min_snr"  # the DDPM registry's spelling
    assert F.get("cosmap").weighting.name == "none" and F.get("uniform+cosmap").weighting.name == "cosmap"
    with pytest.raises(ValueError, match="unknown flow strategy"):
        F.get("lognorm")
    with pytest.raises(ValueError, match="not accepted"):
        F.get("uniform", gamma=3)
    with pytest.raises(ValueError, match="std"):
        F.get("logit_normal", std=0.0)
    with pytest.raises(ValueError, match="lo < hi"):
        F.get("uniform", clamp=(0.5, 0.4))
    with pytest.raises(TypeError, match="mean"):
        F.get("logit_normal", mean="0")
    with pytest.raises(ValueError, match="prediction"):
        F.get("min_snr").weight(np.array([0.5]), "score")


def test_quantile_rows_are_exact_in_float32():
    q, dq = F.quantile_rows(F.get("logit_normal", shift=3.0).density)
    assert np.all(q.astype(np.float32).astype(np.float64) == q)
    # every slope has at most 12 significant bits and stays inside its cell
    m, _ = np.frexp(dq)
    assert np.all(m * 4096 == np.trunc(m * 4096))
    assert np.all(q[:-1] + dq[:-1] <= q[1:])
