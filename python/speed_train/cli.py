"""`speed-kernels train` and `speed-kernels sample` (and `compare`, when speed_train.compare exists).

    speed-kernels train                                   # digits, unet-tiny, SpeeD, a few CPU minutes
    speed-kernels train --data fashion-mnist --model unet-small --strategy uniform --steps 20000
    speed-kernels train --strategy speed --param k=5 --param lam=0.6 --resume
    torchrun --nproc_per_node 2 -m speed_kernels.cli train --device cuda
    speed-kernels sample --ckpt runs/digits-unet-tiny-speed/ckpt.pt --n 64 --sampler ddim --steps 50 --out grid.png
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

__all__ = ["add_commands", "parse_params", "config_from_args"]


def parse_params(items) -> dict:
    """['k=5', 'lam=0.6', 'mirror=false'] -> {'k': 5, 'lam': 0.6, 'mirror': False}."""
    out = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects key=value, got {item!r}")
        low = val.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        for conv in (int, float):
            try:
                out[key] = conv(val)
                break
            except ValueError:
                pass
        else:
            out[key] = val
    return out


def _train_parser(p: argparse.ArgumentParser):
    from .trainer import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("what to train")
    g.add_argument("--model", help="auto (default: unet-tiny on digits, unet-small on other images, DiT-S/2 "
                   "on arrays) or one of: DiT-tiny, DiT-{S,B,L,XL}/{2,4,8}, unet-tiny, unet-small, unet-base")
    g.add_argument("--data", help=f"digits (default) | fashion-mnist | a folder of images | a .npy/.npz file")
    g.add_argument("--image-size", type=int, help="resize the data to this size (default: its own)")
    g.add_argument("--uncond", action="store_true", help="ignore the labels: an unconditional model")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="horizontal flips (default: on for images, off for digits and arrays)")
    g = p.add_argument_group("diffusion and loss")
    g.add_argument("--strategy", help=f"time-step strategy (default {d.strategy})")
    g.add_argument("--param", action="append", metavar="K=V", help="strategy parameter, repeatable (e.g. k=5)")
    g.add_argument("--prediction", choices=["eps", "v", "x0"])
    g.add_argument("--learn-sigma", action="store_true", help="2C outputs and DiT's hybrid loss")
    g.add_argument("--schedule", help=f"noise schedule (default {d.schedule})")
    g.add_argument("--backend", help="loss backend: auto | triton | cuda | cpp | torch")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"training steps (default {d.steps})")
    g.add_argument("--batch-size", type=int, help=f"global batch (default {d.batch_size})")
    g.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3 on digits, else 1e-4)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--ema", type=float, help="EMA decay (default min(0.9999, 1 - 10/steps))")
    g.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0 for none (default {d.grad_clip})")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; 1 per rank under torchrun)")
    g.add_argument("--no-bf16", dest="bf16", action="store_false", default=None, help="fp32 on CUDA too")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder (default runs/<name>)")
    g.add_argument("--name", help="run name (default <data>-<model>-<strategy>)")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue from <out>/ckpt.pt (or CKPT) exactly")
    g.add_argument("--log-every", type=int, help=f"metrics.jsonl interval (default {d.log_every})")
    g.add_argument("--sample-every", type=int, help="sample grid interval (default: at the end only)")
    g.add_argument("--ckpt-every", type=int, help=f"checkpoint interval (default {d.ckpt_every}; always at the end)")
    g.add_argument("--sample-n", type=int, help=f"samples per grid (default {d.sample_n})")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], help=f"grid sampler (default {d.sampler})")
    g.add_argument("--sample-steps", type=int, help=f"grid sampler steps (default {d.sample_steps})")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale for grids (default 1: none)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=cmd_train)


def config_from_args(args):
    from .trainer import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.param:
        kw["strategy_params"] = parse_params(args.param)
    if args.uncond:
        kw["class_cond"] = False
    if not args.learn_sigma:
        kw.pop("learn_sigma", None)
    if kw.get("grad_clip") == 0:
        kw["grad_clip"] = None
    return TrainConfig(**kw)


def cmd_train(args) -> int:
    from .trainer import Trainer

    cfg = config_from_args(args)
    trainer = Trainer(cfg)
    try:
        s = trainer.run()
    finally:
        trainer.close()
    if trainer.is_main:
        sps = f"{s['steps_per_s']:.2f}" if s["steps_per_s"] else "n/a"
        print(f"trained {s['name']}: {s['steps']} steps, final loss {s['final_loss']:.4f}, {sps} steps/s\n"
              f"  samples:    {s['samples']}\n  loss curve: {s.get('loss_curve')}\n"
              f"  checkpoint: {s['checkpoint']}\n  metrics:    {trainer.metrics_path}")
    return 0


def _sample_parser(p: argparse.ArgumentParser):
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `speed-kernels train`")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="respaced sampler steps (default 50)")
    p.add_argument("--out", default="samples.png", help="PNG grid path (default samples.png)")
    p.add_argument("--npz", help="also save the raw samples (and labels) to this .npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--class", dest="cls", type=int, help="sample only this class (default: cycle the classes)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--batch", type=int, default=256, help="samples per model call batch")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .sampling import sample, save_grid
    from .trainer import _pick_device, load_checkpoint_model

    device = _pick_device(args.device, 0)
    model, schedule, info = load_checkpoint_model(args.ckpt, device=device, use_ema=not args.no_ema)
    cfg, margs = info["config"], info["model_args"]
    k = margs["num_classes"]
    if args.n < 1:
        raise ValueError("--n must be at least 1")
    if args.cls is not None and not 0 <= args.cls < max(k, 1):
        raise ValueError(f"--class {args.cls}: the model has {k} classes" if k else "--class: the model is unconditional")
    y = None
    if k:
        y = torch.full((args.n,), args.cls) if args.cls is not None else torch.arange(args.n) % k
    shape = (margs["in_channels"], margs["image_size"], margs["image_size"])
    amp = torch.bfloat16 if (device.type == "cuda" and cfg.get("bf16", True)) else None
    chunks = []
    for i, start in enumerate(range(0, args.n, args.batch)):
        n = min(args.batch, args.n - start)
        chunks.append(sample(model, schedule, (n, *shape), sampler=args.sampler, steps=args.steps,
                             prediction=cfg["prediction"], learn_sigma=margs["learn_sigma"],
                             y=y[start:start + n] if y is not None else None, guidance=args.guidance,
                             clip=info["data"]["pixel_space"], seed=args.seed + i, device=device,
                             autocast_dtype=amp).cpu())
    x = torch.cat(chunks)
    nrow = k if (k and k <= 16 and args.cls is None) else None
    save_grid(x, args.out, nrow=nrow)
    if args.npz:
        np.savez(args.npz, x=x.numpy(), **({"y": y.numpy()} if y is not None else {}))
    print(f"{args.n} samples ({args.sampler}-{args.steps}, step {info['step']} "
          f"{'raw' if args.no_ema else 'EMA'} weights) -> {args.out}")
    return 0


def _add_encode_command(subparsers) -> None:
    from .autoencoder import add_encode_command

    add_encode_command(subparsers)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a DiT / U-Net denoiser with a time-step strategy",
                              description="Train a diffusion model with SpeeD (or another strategy) on the fused loss.")
    _train_parser(p)
    p = subparsers.add_parser("sample", help="draw a sample grid from a training checkpoint")
    _sample_parser(p)
    _add_encode_command(subparsers)
    try:
        from speed_train.compare import add_compare_command
    except ModuleNotFoundError as exc:  # compare.py not written yet; anything else is a real error
        if exc.name != "speed_train.compare":
            raise
    else:
        add_compare_command(subparsers)


def main(argv=None) -> int:  # `python -m speed_train.cli` without the top-level dispatcher
    parser = argparse.ArgumentParser(prog="speed-train")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
