"""Flow-matching engine: the Euler / Heun samplers against the exact ODE of Gaussian data, the
shifted sigma grid, and a short `objective="flow"` training run."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from speed_train.sampling import flow_sample, flow_sigmas, flow_velocity
from speed_train.trainer import TrainConfig, Trainer

M, D = 0.7, 0.4  # data ~ N(M, D^2): its flow ODE is known in closed form


class ExactVelocity(torch.nn.Module):
    """v(x, sigma) = dx/dsigma of x(sigma) = (1 - sigma) M + sqrt(V(sigma)) z, V = (1-sigma)^2 D^2 + sigma^2,
    written as the given prediction (v, x0 = x - sigma v, eps = x + (1 - sigma) v)."""

    def __init__(self, prediction="v"):
        super().__init__()
        self.prediction = prediction
        self.w = torch.nn.Parameter(torch.zeros(()))  # a device for the sampler

    def forward(self, x, t, y=None):
        s = (t / 1000.0).double().view(-1, *([1] * (x.dim() - 1)))
        xd = x.double()
        V = (1 - s) ** 2 * D * D + s * s
        dV = -2 * (1 - s) * D * D + 2 * s
        z = (xd - (1 - s) * M) / V.sqrt()
        v = -M + dV / (2 * V.sqrt()) * z
        out = {"v": v, "x0": xd - s * v, "eps": xd + (1 - s) * v}[self.prediction]
        return out.float()


def _exact_end(shape, seed):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # x at sigma = 1 is z (V(1) = 1)
    return M + D * z


def test_flow_sigmas_are_the_shifted_grid():
    s = flow_sigmas(8, shift=3.0)
    base = np.linspace(1, 0, 9)
    np.testing.assert_allclose(s, 3 * base / (1 + 2 * base))
    assert s[0] == 1.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0)
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas(0)


@pytest.mark.parametrize("prediction", ["v", "x0", "eps"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_heun_is_second_order_and_beats_euler(prediction, shift):
    shape = (256, 1, 2, 2)
    want = _exact_end(shape, seed=3)
    model = ExactVelocity(prediction)
    errs = {}
    for sampler in ("euler", "heun"):
        for steps in (20, 40):
            x = flow_sample(model, shape, sampler=sampler, steps=steps, shift=shift, prediction=prediction,
                            clip=False, seed=3, device="cpu")
            errs[sampler, steps] = float((x - want).abs().max())
    assert errs["euler", 40] < errs["euler", 20] and errs["heun", 40] < errs["heun", 20]  # converges
    if prediction == "eps":
        # eps = x at sigma = 1 whatever the velocity: the first step cannot see v (documented)
        return
    assert 1.7 < errs["euler", 20] / errs["euler", 40] < 2.3  # first order: halving h halves the error
    assert errs["heun", 20] / errs["heun", 40] > 3.5  # second order: a quarter
    assert errs["heun", 40] < errs["euler", 40] / 4


def test_flow_velocity_conversions():
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    s = 0.3
    assert torch.allclose(flow_velocity(x - s * v, x, s, "x0"), v, atol=1e-6)
    assert torch.allclose(flow_velocity(x + (1 - s) * v, x, s, "eps"), v, atol=1e-6)
    with pytest.raises(ValueError, match="prediction"):
        flow_velocity(v, x, s, "score")


def test_short_flow_training_run(tmp_path):
    torch.set_num_threads(1)
    cfg = TrainConfig(data="digits", model="unet-tiny", batch_size=32, steps=40, log_every=10, ckpt_every=0,
                      sample_n=10, sample_steps=4, progress=False, out=str(tmp_path / "run"), device="cpu",
                      ema=0.9, objective="flow", prediction="v", strategy="logit_normal",
                      strategy_params={"shift": 2.0})
    tr = Trainer(cfg)
    assert tr.cfg.sampler == "euler" and tr.loss_fn.shift == 2.0
    s = tr.run()
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    x = tr.sample(6, sampler="heun", steps=3)
    assert x.shape == (6, *tr.data.shape) and torch.isfinite(x).all()
    assert s["steps"] == 40
    tr.close()
    with pytest.raises(ValueError, match="sampler"):
        Trainer(TrainConfig(data="digits", objective="flow", sampler="ddim", device="cpu", out=str(tmp_path / "x")))


def _flow_cfg(out, **kw):
    base = dict(data="digits", model="unet-tiny", batch_size=16, steps=12, log_every=1, ckpt_every=0, sample_n=4,
                sample_steps=2, progress=False, out=str(out), device="cpu", ema=0.9, objective="flow",
                prediction="v", strategy="speed")
    base.update(kw)
    return TrainConfig(**base)


def test_flow_resume_gives_identical_per_step_losses(tmp_path):
    torch.set_num_threads(1)

    def losses(out):
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows}

    straight = _flow_cfg(tmp_path / "a")
    Trainer(straight).run()
    Trainer(_flow_cfg(tmp_path / "b", steps=6)).run()
    tr = Trainer(_flow_cfg(tmp_path / "b", resume=True))
    assert tr.step == 6
    tr.run()
    a, b = losses(straight.out), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [a[k] for k in sorted(a)] == [b[k] for k in sorted(b)]  # bit-identical: the sigma/eps stream resumed


def test_flow_runs_predict_v_unless_told_otherwise():
    from speed_train.trainer import TrainConfig

    assert TrainConfig(objective="flow").resolved("digits", True).prediction == "v"
    assert TrainConfig().resolved("digits", True).prediction == "eps"
    assert TrainConfig(objective="flow", prediction="x0").resolved("digits", True).prediction == "x0"
