"""Under torchrun (gloo, 2 CPU processes) each rank draws its own t and eps every step: the key
folds the rank in, so two ranks with one seed must not train on the same noise (which would halve
the effective batch), and each rank's stream is the one a single process with that rank draws."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from speed_kernels import DiffusionLoss, NoiseSchedule
    from speed_train.adapters import create_speed_diffusion

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    backend = sys.argv[2]
    x0 = torch.rand(8, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1  # the same batch on both
    fn = DiffusionLoss(NoiseSchedule.linear(), "speed", backend=backend, seed=1234, rank=rank)
    d = create_speed_diffusion(strategy="speed", learn_sigma=False, backend=backend, seed=1234, rank=rank)
    rows = []
    for step in range(3):
        x_t, t = fn.noise(x0)
        eps = fn.loss(torch.zeros_like(x0), x0, t, reduction="none")  # per-sample mean(eps^2) * w
        t_ad = d.sample_timesteps(8, "cpu")
        seen = {}
        d.training_losses(lambda x, tt: seen.setdefault("x_t", x) * 0, x0, t_ad)
        mine = torch.cat([t.double(), x_t.flatten(), eps.double(), t_ad.double(), seen["x_t"].flatten().double()])
        got = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(got, mine)
        rows.append([g.tolist() for g in got])
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _single_process(rank, backend):
    """What one process with this rank draws (no torchrun): the reference each rank must match."""
    import torch

    from speed_kernels import DiffusionLoss, NoiseSchedule
    from speed_train.adapters import create_speed_diffusion

    x0 = torch.rand(8, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fn = DiffusionLoss(NoiseSchedule.linear(), "speed", backend=backend, seed=1234, rank=rank)
    d = create_speed_diffusion(strategy="speed", learn_sigma=False, backend=backend, seed=1234, rank=rank)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (the reductions' order then matches too)
    try:
        rows = _steps(fn, d, x0)
    finally:
        torch.set_num_threads(threads)
    return rows


def _steps(fn, d, x0):
    import torch

    rows = []
    for _ in range(3):
        x_t, t = fn.noise(x0)
        eps = fn.loss(torch.zeros_like(x0), x0, t, reduction="none")
        t_ad = d.sample_timesteps(8, "cpu")
        seen = {}
        d.training_losses(lambda x, tt: seen.setdefault("x_t", x) * 0, x0, t_ad)
        rows.append(torch.cat([t.double(), x_t.flatten(), eps.double(), t_ad.double(), seen["x_t"].flatten().double()]))
    return rows


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_ranks_draw_different_t_and_eps_every_step(tmp_path, backend):
    import torch

    if backend == "cpp":
        from speed_kernels.backends import _LOAD_ERRORS, _try_load

        from required import missing

        if _try_load("cpp") is None:
            missing("the cpp backend", _LOAD_ERRORS.get("cpp"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out), backend]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = json.loads(out.read_text())
    B, n = 8, 8 * 32
    refs = {rank: _single_process(rank, backend) for rank in (0, 1)}
    for step, (r0, r1) in enumerate(rows):
        r0, r1 = torch.tensor(r0), torch.tensor(r1)
        t0, t1 = r0[:B], r1[:B]
        x0_, x1_ = r0[B : B + n], r1[B : B + n]
        ta0, ta1 = r0[2 * B + n : 3 * B + n], r1[2 * B + n : 3 * B + n]
        xa0, xa1 = r0[3 * B + n :], r1[3 * B + n :]
        assert not torch.equal(t0, t1), f"step {step}: both ranks drew the same t"
        # same x0 on both ranks: x_t differs in every sample whose eps differs (even at equal t)
        assert (x0_.view(B, -1) != x1_.view(B, -1)).any(1).all(), f"step {step}: a sample's eps is shared by the ranks"
        assert not torch.equal(ta0, ta1), f"step {step}: the adapter drew the same t on both ranks"
        assert (xa0.view(B, -1) != xa1.view(B, -1)).any(1).all(), f"step {step}: the adapter's eps is shared"
        for rank, got in ((0, r0), (1, r1)):
            ref = refs[rank][step]
            bad = (got - ref).abs() > 1e-6 * (1 + ref.abs())
            assert not bad.any(), f"rank {rank} step {step}: differs from a single process at {bad.nonzero().flatten()[:8].tolist()}"
