"""The `torch-fast` fallback backend: right distributions, the reference's loss on its own eps,
deterministic and resumable, and chosen by `auto` only where no kernel backend loads (once, loudly)."""
import math
import warnings

import pytest
import torch
from scipy import stats

from speed_kernels import DiffusionLoss, NoiseSchedule
from speed_kernels import backends as backends_mod
from speed_kernels import reference, strategies
from speed_kernels.fast_torch import TorchFastBackend, stream_seed
from speed_kernels.tables import ROW_SQRT_1MAB, ROW_SQRT_AB


def _loss(strategy="speed", **kw):
    return DiffusionLoss(NoiseSchedule.linear(), strategy=strategy, backend="torch-fast", seed=11, **kw)


def test_t_follows_probs_chi_square():
    fn = _loss("speed", strategy_params={"mirror": False})
    x0 = torch.zeros(4096, 1, 1, 1)
    counts = torch.zeros(1000, dtype=torch.float64)
    for _ in range(8):
        _, t = fn.noise(x0)
        counts += torch.bincount(t, minlength=1000).double()
    probs = torch.as_tensor(strategies.get("speed", mirror=False).probs(NoiseSchedule.linear(), step=0))
    # two bins: below / above tau (1000 sparse bins would make chi-square meaningless at this n)
    n = counts.sum()
    obs = torch.stack([counts[:700].sum(), counts[700:].sum()])
    exp = torch.stack([probs[:700].sum(), probs[700:].sum()]) * n
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < stats.chi2.ppf(0.999, df=1), (obs.tolist(), exp.tolist())
    # and the fine structure: KS of t against the discrete CDF
    ks = stats.kstest(torch.repeat_interleave(torch.arange(1000.0), counts.long()).numpy() + 0.5,
                      lambda x: torch.cumsum(probs, 0)[torch.as_tensor(x).long().clamp(max=999)].numpy())
    assert ks.statistic < 0.02


def test_mirror_half_batch():
    fn = _loss("speed")  # official code: mirrored half batch
    x0 = torch.zeros(9, 2)
    _, t = fn.noise(x0)
    n_draw = 9 // 2 + 1
    assert torch.equal(t[n_draw:], (t[: 9 - n_draw] - fn.pivot).abs())


def test_eps_is_standard_normal_and_regenerated_in_loss():
    fn = _loss("uniform")
    x0 = torch.zeros(64, 4, 16, 16)
    x_t, t = fn.noise(x0)
    tab = fn.tables("cpu")
    eps = x_t / tab[ROW_SQRT_1MAB][t].view(-1, 1, 1, 1)  # x0 = 0: x_t = sqrt(1-ab) * eps
    assert abs(float(eps.mean())) < 0.02 and abs(float(eps.std()) - 1) < 0.02
    assert stats.kstest(eps.flatten()[:20000].numpy(), "norm").pvalue > 1e-3
    # loss() sees the same eps: pred = eps gives zero loss
    pred = eps.clone().requires_grad_()
    assert float(fn.loss(pred, x0, t).detach()) < 1e-9


@pytest.mark.parametrize("prediction,learn_sigma", [("eps", False), ("v", False), ("x0", False), ("eps", True)])
def test_loss_and_grad_match_reference_on_the_same_eps(prediction, learn_sigma):
    g = torch.Generator().manual_seed(5)
    fn = _loss("speed", prediction=prediction, learn_sigma=learn_sigma)
    x0 = torch.randn(6, 3, 4, 4, generator=g)
    x_t, t = fn.noise(x0)
    tab = fn.tables("cpu")
    shape = (-1, 1, 1, 1)
    eps = (x_t - tab[ROW_SQRT_AB][t].view(shape) * x0) / tab[ROW_SQRT_1MAB][t].view(shape)
    C = 6 if learn_sigma else 3
    pred = torch.randn(6, C, 4, 4, generator=g).requires_grad_()
    ours = fn.loss(pred, x0, t)
    (g_ours,) = torch.autograd.grad(ours, pred)
    pred_ref = pred.detach().clone().requires_grad_()
    ref, _ = reference.loss(pred_ref, x0, t, tab, 0, 0, None, fn.target, learn_sigma, True, eps=eps)
    (g_ref,) = torch.autograd.grad(ref, pred_ref)
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=2e-5, atol=1e-7)


def test_deterministic_and_resumes_exactly():
    x0 = torch.randn(8, 3, 4, 4)
    a = _loss()
    first = [a.noise(x0) for _ in range(2)]
    state = a.state_dict()
    rest_a = [a.noise(x0) for _ in range(3)]
    b = _loss()
    b.load_state_dict(state)
    rest_b = [b.noise(x0) for _ in range(3)]
    for (xa, ta), (xb, tb) in zip(rest_a, rest_b):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    # consecutive calls, ranks and streams differ
    assert not torch.equal(first[0][0], first[1][0])
    other_rank = DiffusionLoss(NoiseSchedule.linear(), backend="torch-fast", seed=11, rank=1)
    assert not torch.equal(other_rank.noise(x0)[0], _loss().noise(x0)[0])
    assert len({stream_seed(1, 2, c, s) for c in range(50) for s in (0, 1)}) == 100


def test_auto_falls_back_to_torch_fast_once_with_a_warning(monkeypatch):
    monkeypatch.setattr(backends_mod, "_AUTO_ORDER", {"cpu": ("no-such-backend",)})
    monkeypatch.setitem(backends_mod._LOAD_ERRORS, "no-such-backend", "ImportError: not built")
    monkeypatch.setattr(backends_mod, "_ANNOUNCED", set())
    with pytest.warns(RuntimeWarning, match="torch-fast.*bit-exact reference"):
        chosen = backends_mod.select("auto", torch.device("cpu"))
    assert isinstance(chosen, TorchFastBackend)
    name, why = backends_mod.auto_choice(torch.device("cpu"))
    assert name == "torch-fast" and "not built" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # announced once per device type
        backends_mod.select("auto", torch.device("cpu"))


def test_auto_prefers_the_kernel_backend_when_built():
    info = backends_mod.backends()
    name, _ = backends_mod.auto_choice(torch.device("cpu"))
    assert name == ("cpp" if info["cpp"] == "available" else "torch-fast")
    assert info["torch-fast"] == "available"


def test_torch_backend_stays_the_bit_exact_reference():
    x0 = torch.randn(5, 2, 3)
    ref = DiffusionLoss(NoiseSchedule.linear(), backend="torch", seed=3)
    x_t, t = ref.noise(x0)
    from speed_kernels.rng import sample_timesteps

    t_expect = sample_timesteps(5, ref.tables("cpu")[3], torch.zeros(1, dtype=torch.int64), ref.k0, ref.k1,
                                ref.strategy.mirror, ref.pivot)
    assert torch.equal(t, t_expect)
    assert math.isfinite(float(x_t.sum()))
