import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from speed_kernels.schedules import NoiseSchedule

TABLES = (
    "betas", "alphas", "alphas_cumprod", "snr", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "alphas_cumprod_prev", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)


def ref_cumprod(betas):
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return np.array(out)


@pytest.mark.parametrize("ctor", [NoiseSchedule.linear, NoiseSchedule.scaled_linear, NoiseSchedule.cosine])
def test_tables_are_float64_cpu_length_T(ctor):
    s = ctor(T=37)
    assert s.T == 37 and len(s) == 37
    for name in TABLES:
        x = getattr(s, name)
        assert isinstance(x, torch.Tensor), name
        assert x.dtype == torch.float64 and x.device.type == "cpu" and x.shape == (37,), name
        assert torch.isfinite(x).all(), name


def test_linear_matches_independent():
    s = NoiseSchedule.linear()
    b = np.array([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)])
    np.testing.assert_allclose(s.betas.numpy(), b, rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), ref_cumprod(b), rtol=1e-10)
    a = ref_cumprod(b)
    np.testing.assert_allclose(s.snr.numpy(), a / (1 - a), rtol=1e-10)
    assert s.name == "linear"


def test_scaled_linear_matches_independent():
    s = NoiseSchedule.scaled_linear(T=1000)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    b = np.array([(lo + (hi - lo) * i / 999) ** 2 for i in range(1000)])
    np.testing.assert_allclose(s.betas.numpy(), b, rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), ref_cumprod(b), rtol=1e-10)


def test_cosine_matches_independent():
    T = 1000
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    b = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    s = NoiseSchedule.cosine(T)
    np.testing.assert_allclose(s.betas.numpy(), b, rtol=1e-10)
    assert s.betas.numpy()[-1] == pytest.approx(0.999)  # capped
    # ᾱ follows the continuous f closely before the cap
    np.testing.assert_allclose(s.alphas_cumprod.numpy()[:900], [f((i + 1) / T) / f(0) for i in range(900)], rtol=1e-9)


def test_guided_diffusion_coefficients():
    s = NoiseSchedule.linear(T=50, beta_start=1e-3, beta_end=0.1)
    b = s.betas.numpy()
    a = ref_cumprod(b)
    ap = np.r_[1.0, a[:-1]]
    pv = b * (1 - ap) / (1 - a)
    np.testing.assert_allclose(s.alphas_cumprod_prev.numpy(), ap, rtol=1e-12)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod.numpy(), np.sqrt(a), rtol=1e-12)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - a), rtol=1e-12)
    np.testing.assert_allclose(s.posterior_variance.numpy(), pv, rtol=1e-10)
    assert s.posterior_variance.numpy()[0] == 0.0
    np.testing.assert_allclose(s.posterior_log_variance_clipped.numpy(), np.log(np.r_[pv[1], pv[1:]]), rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef1.numpy(), b * np.sqrt(ap) / (1 - a), rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef2.numpy(), (1 - ap) * np.sqrt(1 - b) / (1 - a), rtol=1e-10)


@pytest.mark.parametrize("bad", [[0.0, 0.1, 0.2], [0.1, 1.0], [0.1, -0.2], [0.1, 1.5], [0.1, float("nan")],
                                 [0.1, float("inf")]])
def test_betas_outside_open_unit_interval_are_errors(bad):
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_betas(bad)


def test_bad_shapes_and_T():
    with pytest.raises(ValueError):
        NoiseSchedule.from_betas([[0.1, 0.2]])
    with pytest.raises(ValueError, match="T"):
        NoiseSchedule.from_betas([0.1])
    with pytest.raises(ValueError, match="T"):
        NoiseSchedule.linear(T=0)
    with pytest.raises(ValueError, match="T"):
        NoiseSchedule.cosine(T=2.5)


def test_from_betas_accepts_tensor_and_numpy():
    b = np.linspace(0.01, 0.2, 10)
    s1 = NoiseSchedule.from_betas(torch.tensor(b, dtype=torch.float32))
    s2 = NoiseSchedule.from_betas(b, name="mine")
    assert s2.name == "mine"
    np.testing.assert_allclose(s1.betas.numpy(), b, rtol=1e-6)


def test_zero_terminal_snr_rescale():
    s = NoiseSchedule.linear()
    z = s.rescale_zero_terminal_snr()
    assert z is not s and z.zero_terminal_snr and not s.zero_terminal_snr
    assert z.alphas_cumprod[-1].item() == 0.0
    assert z.snr[-1].item() == 0.0
    assert z.betas[-1].item() == 1.0
    assert torch.isfinite(z.snr).all() and (z.snr[:-1] > 0).all()
    # independent formula
    sa = np.sqrt(ref_cumprod(s.betas.numpy()))
    expect = ((sa - sa[-1]) * sa[0] / (sa[0] - sa[-1])) ** 2
    np.testing.assert_allclose(z.alphas_cumprod.numpy(), expect, rtol=1e-9, atol=1e-15)
    assert z.alphas_cumprod[0].item() == pytest.approx(s.alphas_cumprod[0].item(), rel=1e-12)
    inner = z.betas.numpy()[:-1]
    assert np.all((inner > 0) & (inner < 1))
    # every derived table stays finite
    for name in TABLES:
        assert torch.isfinite(getattr(z, name)).all(), name
    # idempotent
    zz = z.rescale_zero_terminal_snr()
    np.testing.assert_allclose(zz.alphas_cumprod.numpy(), z.alphas_cumprod.numpy(), rtol=1e-12, atol=1e-300)
    assert zz.name == z.name == "linear+zsnr"


def test_dict_round_trip_including_zero_terminal():
    for s in (NoiseSchedule.cosine(100), NoiseSchedule.scaled_linear(100).rescale_zero_terminal_snr()):
        d = s.to_dict()
        import json

        d = json.loads(json.dumps(d))
        r = NoiseSchedule.from_dict(d)
        assert r.name == s.name and r.T == s.T and r.zero_terminal_snr == s.zero_terminal_snr
        assert torch.equal(r.betas, s.betas) and torch.equal(r.alphas_cumprod, s.alphas_cumprod)
    with pytest.raises(ValueError):
        NoiseSchedule.from_dict({"nope": 1})


def test_from_diffusers_dict_and_objects():
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    ref = NoiseSchedule.scaled_linear()
    assert torch.equal(NoiseSchedule.from_diffusers(cfg).betas, ref.betas)
    sched = SimpleNamespace(config=dict(cfg))  # scheduler with a dict-like config
    assert torch.equal(NoiseSchedule.from_diffusers(sched).betas, ref.betas)
    sched2 = SimpleNamespace(config=SimpleNamespace(**cfg, trained_betas=None))  # attribute config
    assert torch.equal(NoiseSchedule.from_diffusers(sched2).betas, ref.betas)
    # defaults are DDPMScheduler's: linear 1e-4 .. 0.02, T = 1000
    assert torch.equal(NoiseSchedule.from_diffusers({}).betas, NoiseSchedule.linear().betas)
    cos = NoiseSchedule.from_diffusers({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 200})
    assert torch.equal(cos.betas, NoiseSchedule.cosine(200).betas)
    tb = NoiseSchedule.from_diffusers({"trained_betas": [0.1, 0.2, 0.3], "beta_schedule": "linear"})
    np.testing.assert_allclose(tb.betas.numpy(), [0.1, 0.2, 0.3])
    z = NoiseSchedule.from_diffusers({**cfg, "rescale_betas_zero_snr": True})
    assert z.zero_terminal_snr and z.alphas_cumprod[-1].item() == 0.0
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_diffusers({"beta_schedule": "sigmoid"})
    with pytest.raises(TypeError):
        NoiseSchedule.from_diffusers(None)


def test_repr_and_numpy():
    s = NoiseSchedule.linear()
    r = repr(s)
    assert "linear" in r and "T=1000" in r
    a = s.numpy("alphas_cumprod")
    a[0] = -1  # a copy
    assert s.alphas_cumprod[0].item() > 0
    with pytest.raises(ValueError, match="key"):
        s.numpy("nope")
