"""DiffusionLoss on the plain-PyTorch backend against independent float64 computations."""
import math

import pytest
import torch

from speed_kernels import DiffusionLoss, NoiseSchedule, rng, strategies


def independent_loss(pred, x0, t, eps, sched, weights, prediction, learn_sigma):
    """DiT / guided-diffusion's training loss written out again in float64, from the betas."""
    betas = sched.betas.double()
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = ab[t].view(shape)
    x0 = x0.double()
    eps = eps.double()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    C = x0.shape[1]
    out = pred[:, :C] if learn_sigma else pred
    target = {"eps": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * x0, "x0": x0}[prediction]
    per = ((out - target) ** 2).flatten(1).mean(1) * weights.double()[t]
    if not learn_sigma:
        return per
    var_out = pred[:, C:]
    b = betas[t].view(shape)
    ap = ab_prev[t].view(shape)
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_var_clipped = torch.cat([post_var[1:2], post_var[1:]])
    lv_true = post_var_clipped.log()[t].view(shape)
    mu_true = b * ap.sqrt() / (1 - a) * x0 + (1 - ap) * (1 - b).sqrt() / (1 - a) * x_t
    od = out.detach()
    x0_hat = {
        "eps": (x_t - (1 - a).sqrt() * od) / a.sqrt(),
        "v": a.sqrt() * x_t - (1 - a).sqrt() * od,
        "x0": od,
    }[prediction]
    mu_model = b * ap.sqrt() / (1 - a) * x0_hat + (1 - ap) * (1 - b).sqrt() / (1 - a) * x_t
    f = (var_out + 1) / 2
    lv_model = f * b.log() + (1 - f) * lv_true
    kl = 0.5 * (-1 + lv_model - lv_true + (lv_true - lv_model).exp() + (mu_true - mu_model) ** 2 / lv_model.exp())

    def cdf(x):
        return 0.5 * (1 + torch.tanh((2 / math.pi) ** 0.5 * (x + 0.044715 * x**3)))

    sd = (0.5 * lv_model).exp()
    up = cdf((x0 - mu_model + 1 / 255) / sd)
    lo = cdf((x0 - mu_model - 1 / 255) / sd)
    logp = torch.where(
        x0 < -0.999,
        up.clamp(min=1e-12).log(),
        torch.where(x0 > 0.999, (1 - lo).clamp(min=1e-12).log(), (up - lo).clamp(min=1e-12).log()),
    )
    vb = torch.where(t.view(shape) == 0, -logp, kl).flatten(1).mean(1) / math.log(2)
    return per + vb


CASES = [(p, ls) for p in ("eps", "v", "x0") for ls in (False, True)]


STRATEGIES = ["uniform", "speed", "p2"]


@pytest.mark.parametrize("prediction,learn_sigma", CASES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_and_grad_match_float64(prediction, learn_sigma, strategy):
    # a fixed integer per case (hash() of a str is salted per process: data would change every run)
    torch.manual_seed(100 * CASES.index((prediction, learn_sigma)) + STRATEGIES.index(strategy))
    sched = NoiseSchedule.linear()
    fn = DiffusionLoss(sched, strategy, prediction=prediction, learn_sigma=learn_sigma, backend="torch", seed=123)
    B, C = 6, 3
    x0 = torch.rand(B, C, 4, 5) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the discretized-likelihood edge bins
    t = torch.tensor([0, 1, 219, 500, 998, 999])
    x_t, t_out = fn.noise(x0, t)
    assert torch.equal(t_out, t)
    eps = rng.normal_per_element(B, C * 20, torch.tensor(0), fn.k0, fn.k1).view_as(x0)
    # A prediction near its target, as a trained model's: a random one puts t = 0's
    # discretized likelihood deep in its clamped tails, where float32 and float64 disagree.
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    target = {"eps": eps, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "x0": x0}[prediction]
    # errors of a comparable size in x0 space whatever the target (x0 error = eps error * sigma_t)
    scale = 0.02 * ((1 - ab).sqrt() if prediction == "x0" else 1.0)
    out = target + scale * torch.randn_like(x0)
    pred = (torch.cat([out, torch.rand_like(x0) * 2 - 1], 1) if learn_sigma else out).requires_grad_(True)
    loss = fn.loss(pred, x0, t)
    loss.backward()
    pred64 = pred.detach().double().requires_grad_(True)
    ref = independent_loss(pred64, x0, t, eps, sched, fn.weights_table, prediction, learn_sigma)
    ref.mean().backward()
    # Learned sigma: the KL divides the difference of two float32 posterior means by a small
    # variance at large t, as guided-diffusion does in float32; 1e-4 relative covers it.
    rtol = 1e-4 if learn_sigma else 2e-5
    torch.testing.assert_close(loss.double(), ref.mean(), rtol=rtol, atol=1e-6)
    # t = 0's discretized likelihood subtracts two CDFs 1/127.5 apart: float32 cancellation
    # there is inherent (guided-diffusion computes it in float32 too), so it gets a norm check.
    g, g64 = pred.grad.double(), pred64.grad
    torch.testing.assert_close(g[1:], g64[1:], rtol=2e-4, atol=1e-7)
    assert (g[0] - g64[0]).norm() <= 1e-3 * g64[0].norm()
    # x_t against the formula
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t.double(), ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double(), rtol=1e-5, atol=1e-6)
    # per-sample terms
    per = fn.last_terms["loss"]
    torch.testing.assert_close(per.double(), ref.detach(), rtol=rtol, atol=1e-6)


def test_reduction_none_and_mean_agree():
    fn = DiffusionLoss(NoiseSchedule.linear(), "speed", backend="torch", seed=1)
    x0 = torch.randn(8, 2, 4, 4)
    x_t, t = fn.noise(x0)
    pred = torch.randn_like(x0, requires_grad=True)
    per = fn.loss(pred, x0, t, reduction="none")
    assert per.shape == (8,) and per.dtype == torch.float32
    torch.testing.assert_close(per.mean(), fn.loss(pred, x0, t))


def test_seed_determinism_and_exact_resume():
    sched = NoiseSchedule.linear()
    x0 = torch.randn(5, 2, 3, 3)

    def run(fn, n):
        return [fn.noise(x0) for _ in range(n)]

    a = DiffusionLoss(sched, "speed", backend="torch", seed=9)
    b = DiffusionLoss(sched, "speed", backend="torch", seed=9)
    c = DiffusionLoss(sched, "speed", backend="torch", seed=10)
    ra, rb, rc = run(a, 3), run(b, 3), run(c, 3)
    for (xa, ta), (xb, tb) in zip(ra, rb):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert not torch.equal(ra[0][0], rc[0][0])
    # resume: the state after 3 calls continues the stream exactly
    state = a.state_dict()
    nxt = run(a, 2)
    d = DiffusionLoss(sched, "speed", backend="torch", seed=0)
    d.load_state_dict(state)
    for (xa, ta), (xd, td) in zip(nxt, run(d, 2)):
        assert torch.equal(xa, xd) and torch.equal(ta, td)
    # ranks have different streams
    r1 = DiffusionLoss(sched, "speed", backend="torch", seed=9, rank=1)
    assert not torch.equal(run(r1, 1)[0][0], ra[0][0])


def test_official_speed_mirror_in_noise():
    fn = DiffusionLoss(NoiseSchedule.linear(), "speed", backend="torch", seed=4)
    assert fn.strategy.mirror and fn.pivot == 642
    B = 10
    _, t = fn.noise(torch.zeros(B, 1, 2, 2))
    n = B // 2 + 1
    assert torch.equal(t[n:], (t[: B - n] - 642).abs())


def test_loss_regenerates_the_noise_calls_eps():
    fn = DiffusionLoss(NoiseSchedule.linear(), "uniform", backend="torch", seed=3)
    x0 = torch.randn(4, 3, 2, 2)
    x_t, t = fn.noise(x0)
    ab = fn.schedule.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    # a perfect eps prediction has (near) zero loss
    assert fn.loss(eps, x0, t).item() < 1e-6


def test_given_noise_path_matches_formula():
    fn = DiffusionLoss(NoiseSchedule.linear(), "uniform", backend="torch", seed=3)
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0, 10, 100, 999])
    x_t, _ = fn.noise(x0, t, noise=noise)
    ab = fn.schedule.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    pred = torch.randn_like(x0)
    torch.testing.assert_close(fn.loss(pred, x0, t, noise=noise), ((pred - noise) ** 2).mean())


def test_bf16_inputs_keep_dtype_and_accumulate_in_fp32():
    fn = DiffusionLoss(NoiseSchedule.linear(), "speed", backend="torch", seed=2)
    x0 = torch.randn(4, 2, 8, 8).bfloat16()
    x_t, t = fn.noise(x0)
    assert x_t.dtype == torch.bfloat16 and t.dtype == torch.int64
    pred = torch.randn_like(x0, requires_grad=True)
    loss = fn.loss(pred, x0, t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert pred.grad.dtype == torch.bfloat16


def test_dynamic_strategy_updates_tables_in_place():
    fn = DiffusionLoss(NoiseSchedule.linear(T=20), "importance", backend="torch", seed=0, strategy_params={"history": 2})
    tab = fn.tables("cpu")
    cdf_before = tab[3].clone()
    ptr = tab.data_ptr()
    x0 = torch.randn(64, 1, 2, 2)
    for _ in range(10):
        x_t, t = fn.noise(x0)
        pred = torch.zeros_like(x0)
        fn.loss(pred, x0, t)
    assert fn.tables("cpu").data_ptr() == ptr
    assert not torch.equal(cdf_before, fn.tables("cpu")[3])


def test_bad_inputs_are_clear_errors():
    sched = NoiseSchedule.linear()
    fn = DiffusionLoss(sched, "speed", backend="torch", seed=0)
    x0 = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="t must lie in"):
        fn.noise(x0, torch.tensor([0, 1, 2, 1000]))
    with pytest.raises(ValueError, match="t must have shape"):
        fn.noise(x0, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="floating"):
        fn.noise(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch and a channel"):
        fn.noise(torch.randn(4))
    with pytest.raises(RuntimeError, match="noise\\(\\) first"):
        fn.loss(torch.randn_like(x0), x0, torch.zeros(4, dtype=torch.int64))
    x_t, t = fn.noise(x0)
    with pytest.raises(ValueError, match="pred has shape"):
        fn.loss(torch.randn(4, 6, 2, 2), x0, t)
    with pytest.raises(ValueError, match="reduction"):
        fn.loss(torch.randn_like(x0), x0, t, reduction="sum")
    with pytest.raises(ValueError, match="unknown backend"):
        DiffusionLoss(sched, backend="nope")
    with pytest.raises(ValueError, match="prediction"):
        DiffusionLoss(sched, prediction="score")
    with pytest.raises(ValueError):
        DiffusionLoss(sched, "no-such-strategy")
    ls = DiffusionLoss(sched, "speed", learn_sigma=True, backend="torch", seed=0)
    ls.noise(x0)
    with pytest.raises(ValueError, match="2C channels"):
        ls.loss(torch.randn_like(x0), x0, t)
    # a non-finite table is refused; a non-finite prediction is the model's business
    zt = sched.rescale_zero_terminal_snr()
    with pytest.raises(ValueError, match="not finite"):
        DiffusionLoss(zt, "uniform", learn_sigma=True, prediction="eps")
    nan_pred = torch.full_like(x0, float("nan"))
    assert torch.isnan(fn.loss(nan_pred, x0, t))


def test_zero_terminal_snr_min_snr_is_finite():
    zt = NoiseSchedule.linear().rescale_zero_terminal_snr()
    for pred in ("eps", "v", "x0"):
        fn = DiffusionLoss(zt, "min-snr", prediction=pred, backend="torch", seed=0)
        assert torch.isfinite(fn.weights_table).all()
        x0 = torch.randn(3, 1, 2, 2)
        x_t, t = fn.noise(x0, torch.tensor([0, 500, 999]))
        assert torch.isfinite(fn.loss(torch.randn_like(x0), x0, t))


def test_state_dict_rejects_mismatch():
    a = DiffusionLoss(NoiseSchedule.linear(), "speed", backend="torch", seed=0)
    b = DiffusionLoss(NoiseSchedule.linear(), "uniform", backend="torch", seed=0)
    with pytest.raises(ValueError, match="strategy"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"seed": 1})


def test_call_runs_the_model_between():
    fn = DiffusionLoss(NoiseSchedule.linear(), "speed", backend="torch", seed=0)
    seen = {}

    def model(x_t, t, y=None):
        seen["y"] = y
        return torch.zeros_like(x_t)

    loss = fn(model, torch.randn(4, 1, 2, 2), y=torch.arange(4))
    assert loss.ndim == 0 and torch.equal(seen["y"], torch.arange(4))
    assert "DiffusionLoss(" in repr(fn) and "torch" in repr(fn)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["uniform", "speed"])
def test_torch_backend_on_cuda_matches_cpu(strategy):
    sched = NoiseSchedule.linear()
    x0 = torch.randn(16, 3, 8, 8)
    cpu = DiffusionLoss(sched, strategy, backend="torch", seed=5)
    gpu = DiffusionLoss(sched, strategy, backend="torch", seed=5)
    xc, tc = cpu.noise(x0)
    xg, tg = gpu.noise(x0.cuda())
    assert torch.equal(tc, tg.cpu())
    torch.testing.assert_close(xg.cpu(), xc, rtol=1e-5, atol=1e-5)
    pred = torch.randn_like(x0)
    torch.testing.assert_close(gpu.loss(pred.cuda(), x0.cuda(), tg).cpu(), cpu.loss(pred, x0, tc), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction,learn_sigma", [("eps", False), ("v", True)])
def test_low_precision_inputs_on_the_torch_backend(dtype, prediction, learn_sigma):
    """fp16/bf16 x0 and pred on the plain-PyTorch backend: x_t in the input dtype, rounded once
    from the float64 value; the loss computed in float32 (float32-accurate on the rounded
    inputs); the gradient in pred's dtype, one rounding of the float64 gradient."""
    sched = NoiseSchedule.linear()
    fn = DiffusionLoss(sched, "speed", prediction=prediction, learn_sigma=learn_sigma, backend="torch", seed=31)
    g = torch.Generator().manual_seed(13)
    B, C = 6, 2
    x0 = (torch.rand(B, C, 4, 4, generator=g) * 2 - 1).to(dtype)
    t = torch.tensor([1, 50, 219, 500, 800, 999])
    x_t, t_out = fn.noise(x0, t)
    assert x_t.dtype == dtype
    eps = rng.normal_per_element(B, C * 16, torch.tensor(0), fn.k0, fn.k1).view(B, C, 4, 4)
    ab = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t64 = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()
    ulp = torch.finfo(dtype).eps
    assert ((x_t.double() - x_t64).abs() <= ulp * x_t64.abs() + 1e-6).all()
    target = {"eps": eps, "v": ab.float().sqrt() * eps - (1 - ab.float()).sqrt() * x0.float()}[prediction]
    out = target + 0.05 * torch.randn(B, C, 4, 4, generator=g)
    pred = torch.cat([out, torch.rand(B, C, 4, 4, generator=g) * 2 - 1], 1) if learn_sigma else out
    pred = pred.to(dtype).requires_grad_()
    loss = fn.loss(pred, x0, t_out)
    assert loss.dtype == torch.float32
    loss.backward()
    assert pred.grad.dtype == dtype
    p64 = pred.detach().double().requires_grad_()
    ref = independent_loss(p64, x0, t, eps, sched, fn.weights_table, prediction, learn_sigma).mean()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4 if learn_sigma else 2e-5, atol=1e-6)
    g64 = p64.grad
    assert ((pred.grad.double() - g64).abs() <= ulp * g64.abs() + 1e-4 * g64.abs().max()).all()
