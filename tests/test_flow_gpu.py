"""GPU tests of the flow-matching Triton and CUDA C++ kernels (marked `gpu`, skipped without
CUDA): bf16 and large shapes against the torch reference on the same device, the same sigma bit for bit,
torch.compile(fullgraph=True) with inductor, CUDA-graph capture and replay with fresh sigma/eps.
`SPEED_GPU_SMOKE=1` runs them on the CPU through the Triton interpreter at tiny shapes (Python
errors only; the CUDA-graph test is skipped there). Unverified on a GPU at the time of writing."""
import os

import pytest
import torch

from speed_kernels import rng
from speed_kernels.flow import FlowMatchingLoss, flow_backends

from required import missing

SMOKE = os.environ.get("SPEED_GPU_SMOKE") == "1" and not torch.cuda.is_available()
if not SMOKE:
    pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

DEV = "cpu" if SMOKE else "cuda"
SHAPES = [(3, 2, 4, 4)] if SMOKE else [(256, 4, 32, 32), (16, 3, 64, 64), (4, 3, 256, 256)]
needs_cuda = pytest.mark.skipif(SMOKE, reason="needs CUDA (smoke run on the CPU)")
KERNELS = ["triton"] if SMOKE else ["triton", "cuda"]


def _need(backend):
    status = flow_backends()[backend]
    if status != "available":
        missing(f"flow backend {backend}", status)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prediction,strategy", [("v", "logit_normal+min_snr"), ("x0", "logit_normal+min_snr"),
                                                 ("eps", "logit_normal+min_snr"), ("v", "logit_normal+sigma_sqrt")])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_match_reference_on_device(kernel, shape, dtype, prediction, strategy):
    _need(kernel)
    x0 = torch.randn(shape, device=DEV).to(dtype)
    pred0 = torch.randn(shape, device=DEV).to(dtype)
    out = {}
    for backend in ("torch", kernel):
        lf = FlowMatchingLoss(strategy, shift=3.0, backend=backend, prediction=prediction, seed=9)
        lf.noise(x0)
        x_t, sigma = lf.noise(x0)
        pred = pred0.clone().requires_grad_(True)
        loss = lf.loss(pred, x0, sigma)
        loss.backward()
        out[backend] = (x_t, sigma, loss, pred.grad)
    (xa, sa, la, ga), (xb, sb, lb, gb) = out["torch"], out[kernel]
    assert torch.equal(sa, sb)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xb.float(), xa.float(), **tol)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb.float(), ga.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-7 if dtype == torch.float32 else 1e-5)


def test_compile_fullgraph_inductor_matches_eager():
    x0 = torch.randn(SHAPES[0], device=DEV)
    conv = torch.nn.Conv2d(x0.shape[1], x0.shape[1], 1).to(DEV)

    def step(lf):
        x_t, sigma = lf.noise(x0)
        return lf.loss(conv(x_t), x0, sigma), sigma

    a = FlowMatchingLoss("speed", backend="triton", seed=1)
    b = FlowMatchingLoss("speed", backend="triton", seed=1)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if SMOKE else "inductor")
    for _ in range(2):
        la, sa = compiled(a)
        lb, sb = step(b)
        assert torch.equal(sa, sb)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_graph_replay_draws_fresh_sigma_and_eps(kernel):
    _need(kernel)
    x0 = torch.randn(SHAPES[0], device=DEV)
    pred = torch.randn(SHAPES[0], device=DEV, requires_grad=True)
    lf = FlowMatchingLoss("logit_normal", backend=kernel, seed=5)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (Triton compiles, the counter and tables are allocated)
        x_t, sigma = lf.noise(x0)
        lf.loss(pred, x0, sigma).backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x_t, sigma = lf.noise(x0)
        loss = lf.loss(pred, x0, sigma)
    seen = []
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        seen.append(sigma.clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    # the replayed draw equals the reference's draw for the same counter value
    call = int(lf._call.item()) - 1
    u = rng.bits_to_uniform(rng.philox4x32(0, torch.arange(x0.shape[0]), torch.tensor(call), 2, lf.k0, lf.k1)[0])
    from speed_kernels.reference import flow_sigma_from_uniform

    assert torch.equal(seen[-1].cpu(), flow_sigma_from_uniform(u, lf.tables("cpu")))
    assert torch.isfinite(loss).item()
