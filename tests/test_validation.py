"""One validation layer (speed_kernels.loss.DiffusionLoss) for every backend: the same bad input
gives the same exception type and message on torch, cpp and triton (interpreter on the CPU);
on CUDA the kernels never read out of bounds and poison an out-of-range t's sample with NaN."""
import math

import pytest
import torch

from speed_kernels import DiffusionLoss
from speed_kernels.backends import _LOAD_ERRORS, _try_load
from speed_kernels.schedules import NoiseSchedule

from required import missing

SCHED = NoiseSchedule.linear(1000)
BACKENDS = ["torch", "cpp", "triton"]


def _loss(backend, **kw):
    if _try_load(backend) is None:
        missing(f"the {backend} backend", _LOAD_ERRORS.get(backend))
    return DiffusionLoss(SCHED, "speed", learn_sigma=True, backend=backend, seed=7, **kw)


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.rand(4, 2, 3, 3, generator=g) * 2 - 1


def _pred(x0):
    return torch.zeros(x0.shape[0], 2 * x0.shape[1], *x0.shape[2:])


# (name, the bad call on a DiffusionLoss that has drawn noise for x0 and got t)
BAD = {
    "loss-t-negative": lambda f, x0, t: f.loss(_pred(x0), x0, torch.tensor([-1, 3, 5, 7])),
    "loss-t-too-large": lambda f, x0, t: f.loss(_pred(x0), x0, torch.tensor([0, 1000, 5, 1234])),
    "loss-t-float": lambda f, x0, t: f.loss(_pred(x0), x0, t.float()),
    "loss-t-shape": lambda f, x0, t: f.loss(_pred(x0), x0, t[:3]),
    "loss-t-list": lambda f, x0, t: f.loss(_pred(x0), x0, t.tolist()),
    "noise-t-negative": lambda f, x0, t: f.noise(x0, torch.tensor([0, -2, 5, 7])),
    "noise-t-too-large": lambda f, x0, t: f.noise(x0, torch.tensor([0, 1000, 5, 7])),
    "noise-t-float": lambda f, x0, t: f.noise(x0, torch.tensor([0.0, 1.5, 2.0, 3.0])),
    "loss-other-batch": lambda f, x0, t: f.loss(_pred(x0[:2]), x0[:2], t[:2]),
    "loss-other-shape": lambda f, x0, t: f.loss(_pred(x0[:, :1]), x0[:, :1].contiguous(), t),
    "loss-not-the-drawn-t": lambda f, x0, t: f.loss(_pred(x0), x0, t.clone()),
}
EXPECT = {
    "loss-t-negative": (ValueError, r"t must lie in \[0, 999\], got out-of-range values \[-1\]"),
    "loss-t-too-large": (ValueError, r"t must lie in \[0, 999\], got out-of-range values \[1000, 1234\]"),
    "loss-t-float": (TypeError, "t must be an integer tensor, got torch.float32"),
    "loss-t-shape": (ValueError, r"t must have shape \(4,\) to match x0, got \(3,\)"),
    "loss-t-list": (TypeError, "t must be an int64 tensor, got list"),
    "noise-t-negative": (ValueError, r"out-of-range values \[-2\]"),
    "noise-t-too-large": (ValueError, r"out-of-range values \[1000\]"),
    "noise-t-float": (TypeError, "t must be an integer tensor"),
    "loss-other-batch": (ValueError, r"latest noise\(\) draw, which was for x0 of shape \(4, 2, 3, 3\)"),
    "loss-other-shape": (ValueError, r"latest noise\(\) draw, which was for x0 of shape \(4, 2, 3, 3\)"),
    "loss-not-the-drawn-t": (ValueError, "t must be the tensor that noise"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_same_error_on_every_backend(case):
    exc_type, pattern = EXPECT[case]
    seen = {}
    for backend in BACKENDS:
        f = _loss(backend)
        x0 = _batch()
        _, t = f.noise(x0)
        call_before = f.state_dict()["call"]
        with pytest.raises(exc_type, match=pattern) as info:
            BAD[case](f, x0, t)
        seen[backend] = (type(info.value), str(info.value))
        assert f.state_dict()["call"] == call_before  # a rejected call draws nothing
        # and the object still scores its draw afterwards
        assert math.isfinite(f.loss(_pred(x0), x0, t).item())
    assert len(set(seen.values())) == 1, seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_before_noise_and_a_given_t_are_accepted_or_refused(backend):
    f = _loss(backend)
    x0 = _batch()
    with pytest.raises(RuntimeError, match=r"call noise\(\) first"):
        f.loss(_pred(x0), x0, torch.zeros(4, dtype=torch.long))
    t_in = torch.tensor([0, 1, 500, 999])
    _, t_out = f.noise(x0, t_in)
    assert torch.equal(t_out, t_in)
    for t in (t_in, t_out, t_in.int()):  # the t given to noise(), the t it returned, a cast of the given t
        if t.dtype != torch.int64 and t is not t_in:
            with pytest.raises(ValueError, match="t must be the tensor that noise"):
                f.loss(_pred(x0), x0, t)
        else:
            assert math.isfinite(f.loss(_pred(x0), x0, t).item())


def _device_backends():
    out = []
    for name in ("triton", "cuda"):
        if torch.cuda.is_available():
            out.append(pytest.param(name, "cuda", marks=pytest.mark.gpu))
    # the triton kernels through the interpreter on the CPU, with the host check switched off
    out.append(pytest.param("triton", "cpu"))
    return out


@pytest.mark.parametrize("backend,device", _device_backends())
def test_kernels_poison_an_out_of_range_t_without_reading_out_of_bounds(backend, device):
    """On CUDA (and with check_inputs=False) no host check runs: the bad sample's x_t, loss
    terms and gradient are NaN, the other samples are exact, and nothing reads past the table."""
    f = _loss(backend, check_inputs=device == "cuda")
    if device == "cpu":
        f.check_inputs = False
    x0 = _batch().to(device)
    t_bad = torch.tensor([5, -1, 1000, 999], device=device)
    x_t, t = f.noise(x0, t_bad)
    assert torch.equal(t.cpu(), t_bad.cpu())
    nan_rows = x_t.flatten(1).isnan().all(1).cpu()
    assert nan_rows.tolist() == [False, True, True, False]
    pred = torch.zeros(4, 4, 3, 3, device=device, requires_grad=True)
    per = f.loss(pred, x0, t, reduction="none")
    assert per.isnan().cpu().tolist() == [False, True, True, False]
    per.sum().backward()
    assert pred.grad.flatten(1).isnan().all(1).cpu().tolist() == [False, True, True, False]
    mean = f.loss(pred.detach().requires_grad_(), x0, t)
    assert math.isnan(mean.item())  # the batch mean carries the poison
    # the good samples equal those of a batch without the bad ones
    ref = _loss("torch")
    x_ok, t_ok = ref.noise(x0.cpu(), torch.tensor([5, 0, 0, 999]))
    torch.testing.assert_close(x_t.cpu()[[0, 3]], x_ok[[0, 3]], rtol=1e-5, atol=2e-6)
    per_ok = ref.loss(torch.zeros(4, 4, 3, 3), x0.cpu(), t_ok, reduction="none")
    torch.testing.assert_close(per.detach().cpu()[[0, 3]], per_ok[[0, 3]], rtol=1e-4, atol=1e-6)
