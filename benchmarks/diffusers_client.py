"""diffusers as a client of our adapter, end to end: train_unconditional.py's training step with the
diff of docs/adapters.md applied (read out of the doc and run, as tests/train/test_diffusers_real.py
does), on diffusers' own UNet2DModel (tiny, random init) and the embedded 8x8 digits, with
diffusers' EMAModel unchanged; then DDIM samples from diffusers' DDIMPipeline with a DDIMScheduler
made from the training scheduler's config, written as a grid to docs/diffusers_ddim_samples.png.

    python benchmarks/diffusers_client.py                       # 3,000 steps, strategy speed (~6 CPU min)
    python benchmarks/diffusers_client.py --steps 300 --out /tmp/samples.png

Needs diffusers (pip install -r requirements-dev.txt). CPU, one thread by default.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "python", ROOT / "tests" / "train"):  # runnable from a checkout
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import diffusers_script as ds  # noqa: E402  (tests/train/diffusers_script.py)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--strategy", default="speed", help="replaces the doc's strategy=\"speed\" (default: as written)")
    ap.add_argument("--ema", type=float, default=0.999, help="EMAModel decay (0: sample the raw weights)")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--n", type=int, default=64, help="samples in the grid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "diffusers_ddim_samples.png"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    import diffusers
    from diffusers.training_utils import EMAModel

    from speed_train.sampling import save_grid

    edit = None
    if a.strategy != "speed":
        def edit(setup, step):
            return ds.replace_once(setup, 'strategy="speed"', f'strategy="{a.strategy}"'), step

    diff = ds.doc_diff(ds.UNCONDITIONAL)
    data = ds.digits()
    model = ds.tiny_unet(a.seed)
    runner = ds.StepRunner(diff, "after", model, edit=edit, args=ds.unconditional_args())
    sched, speed = runner.ns["noise_scheduler"], runner.ns["speed"]
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{a.threads} thread(s)\n{speed!r}\nUNet2DModel: {sum(p.numel() for p in model.parameters()):,} parameters")
    print("the step run (docs/adapters.md, '+' side):\n" + runner.step_code)

    ema = EMAModel(model.parameters(), decay=a.ema) if a.ema > 0 else None
    before = ds.eval_loss(model, sched, data)
    t0 = time.time()
    losses = ds.train(runner, data, a.steps, a.batch_size, a.lr, a.seed, log_every=max(1, a.steps // 10),
                      after_step=(lambda: ema.step(model.parameters())) if ema else None)
    secs = time.time() - t0
    sample_model = model
    if ema is not None:
        sample_model = copy.deepcopy(model)
        ema.copy_to(sample_model.parameters())
    after = ds.eval_loss(sample_model, sched, data)
    samples = ds.ddim_samples(sample_model, sched, n=a.n, steps=a.sample_steps, seed=a.seed)
    noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(a.seed + 1)).clamp(-1, 1)
    print(f"{a.steps} steps in {secs:.0f} s ({a.steps / secs:.1f} steps/s); training loss {np.mean(losses[:50]):.4f} "
          f"(first 50) -> {np.mean(losses[-50:]):.4f} (last 50); the script's uniform eps loss on a fixed batch "
          f"{before:.4f} -> {after:.4f}{' (EMA weights)' if ema else ''}")
    print(f"DDIM ({a.sample_steps} steps): nearest-digit distance {ds.nearest_data_distance(samples, data):.2f} "
          f"(clipped noise: {ds.nearest_data_distance(noise, data):.2f}); mean-image correlation "
          f"{ds.mean_image_correlation(samples, data):.2f} (noise: {ds.mean_image_correlation(noise, data):.2f})")
    print("wrote", save_grid(samples, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
