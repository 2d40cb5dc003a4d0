"""The C++ autograd node of speed_kernels::loss (csrc/registration.cpp): one native node per step,
gradients equal to the plain-PyTorch reference's, grad_output scaling, the in-place eager
shortcut refusing a second backward, double backward out of place."""
from __future__ import annotations

import os

import pytest
import torch

from speed_kernels import DiffusionLoss, NoiseSchedule, _ext

REQUIRE = os.environ.get("SPEED_KERNELS_REQUIRE_EXT") == "1"


@pytest.fixture(autouse=True)
def _need_extension():
    info = _ext.available()
    if not info["built"]:
        if REQUIRE:
            pytest.fail(f"SPEED_KERNELS_REQUIRE_EXT=1 but the extension is missing: {info['error']}")
        pytest.skip(info["error"])


def _pair(learn_sigma, seed):
    """(ours, reference) DiffusionLoss objects with the same stream, and fresh inputs."""
    sched = NoiseSchedule.linear()
    ours = DiffusionLoss(sched, "speed", learn_sigma=learn_sigma, backend="cpp", seed=seed)
    ref = DiffusionLoss(sched, "speed", learn_sigma=learn_sigma, backend="torch", seed=seed)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(5, 3, 4, 4, generator=g)
    pred = torch.randn(5, 6 if learn_sigma else 3, 4, 4, generator=g)
    return ours, ref, x0, pred


def test_the_autograd_kernel_is_the_native_one():
    assert _ext.CPP_AUTOGRAD, "this build registers the loss formula from Python (an old _C?)"
    ours, _, x0, pred = _pair(False, 1)
    pred.requires_grad_()
    _, t = ours.noise(x0)
    loss = ours.loss(pred, x0, t)
    assert "LossFunction" in loss.grad_fn.name()  # the C++ node, not a Python autograd.Function
    # one node between the loss and the leaf
    (nxt,) = [f for f, _ in loss.grad_fn.next_functions if f is not None]
    assert type(nxt).__name__ == "AccumulateGrad" and nxt.variable is pred


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_gradient_matches_reference_with_grad_output(learn_sigma, scale):
    ours, ref, x0, pred = _pair(learn_sigma, 7)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    _, t1 = ours.noise(x0)
    _, t2 = ref.noise(x0)
    assert torch.equal(t1, t2)
    (ours.loss(p1, x0, t1) * scale).backward()
    (ref.loss(p2, x0, t2) * scale).backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=2e-4, atol=1e-6)


def test_second_backward_is_refused_not_scaled_twice():
    ours, _, x0, pred = _pair(False, 3)
    pred.requires_grad_()
    _, t = ours.noise(x0)
    loss = ours.loss(pred, x0, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_create_graph_backward_is_out_of_place_and_correct():
    ours, ref, x0, pred = _pair(False, 11)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    _, t = ours.noise(x0)
    _, t_ref = ref.noise(x0)
    assert torch.equal(t, t_ref)
    (g1,) = torch.autograd.grad(ours.loss(p1, x0, t), p1, create_graph=True)
    (g2,) = torch.autograd.grad(ref.loss(p2, x0, t_ref), p2)
    torch.testing.assert_close(g1, g2, rtol=2e-4, atol=1e-6)
    # the out-of-place scaling left nothing behind: a fresh step gives the same gradient
    (g1b,) = torch.autograd.grad(ours.loss(p1, x0, t), p1)
    torch.testing.assert_close(g1b, g2, rtol=2e-4, atol=1e-6)


def test_forward_without_gradient_cannot_backprop():
    ours, _, x0, pred = _pair(False, 5)
    _, t = ours.noise(x0)
    tab, call = ours.tables(x0.device), ours._counter(x0.device)
    p = pred.clone().requires_grad_()
    loss, _, grad = torch.ops.speed_kernels.loss(p, x0, t, tab, ours.k0, ours.k1, call, 0, False, True, False)
    assert grad.numel() == 0
    with pytest.raises(RuntimeError, match="with_grad=False"):
        loss.backward()
