"""The `speed-kernels` command: `analyze` (speed_kernels.analysis), `train`, `sample` and
`compare` (speed_train). It lives here, in the application package, because it drives both; the
library speed_kernels never imports speed_train.

    speed-kernels train                                   # digits, unet-tiny, SpeeD, a few CPU minutes
    speed-kernels train --data fashion-mnist --model unet-small --strategy uniform --steps 20000
    speed-kernels train --strategy speed --param k=5 --param lam=0.6     # or --strategy speed:k=5,lam=0.6
    speed-kernels train --out runs/x --resume                           # continue exactly (or refuse)
    speed-kernels train --out runs/x --resume --steps 4000 --override lr --lr 5e-4
    torchrun --nproc_per_node 2 -m speed_train.cli train --device cuda
    speed-kernels sample --ckpt runs/digits-unet-tiny-speed/ckpt.pt --n 64 --sampler ddim --steps 50 --out grid.png

A user error (bad flag value, missing file, refused resume, a failed checkpoint write, a
non-finite loss) prints one line and exits with status 2; set SPEED_KERNELS_TRACEBACK=1 to see
the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from speed_kernels.analysis import (USER_ERRORS, OneLineParser, add_analyze_command, one_line, parse_params,
                                    parse_strategy_spec, route_params_unchecked)

__all__ = ["add_commands", "build_parser", "config_from_args", "main"]


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
    g.add_argument("--strategy", help=f"time-step strategy, NAME or NAME:KEY=VALUE,... (default {d.strategy})")
    g.add_argument("--param", action="append", metavar="[STRATEGY:]KEY=VALUE",
                   help="strategy parameter, repeatable (e.g. k=5); checked against the strategy's signature")
    g.add_argument("--prediction", choices=["eps", "v", "x0"], help="what the model predicts (default eps; v with --objective flow)")
    g.add_argument("--learn-sigma", action="store_true", help="2C outputs and DiT's hybrid loss")
    g.add_argument("--schedule", help=f"noise schedule (default {d.schedule})")
    g.add_argument("--T", type=int, help=f"diffusion steps (default {d.T})")
    g.add_argument("--backend", help="loss backend: auto | triton | cuda | cpp | torch")
    g.add_argument("--objective", choices=["diffusion", "flow"],
                   help="diffusion (default) or flow matching (flow strategies; --param shift=3; euler/heun)")
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
                   help="continue exactly from the newest readable checkpoint in --out (or the file CKPT); "
                        "the checkpoint's settings hold, a differing flag is an error unless --override'd")
    g.add_argument("--override", dest="overrides", action="append", metavar="KEY",
                   help="on --resume, let setting KEY (e.g. lr, grad_clip, ema) take this command line's value; "
                        "repeatable; recorded in run.json")
    g.add_argument("--keep-ckpts", type=int, help=f"checkpoints kept (default {d.keep_ckpts})")
    g.add_argument("--skip-nonfinite", type=int, metavar="N",
                   help="skip up to N steps with a non-finite loss or gradient (default 0: stop at the first; "
                        "counted in metrics.jsonl)")
    g.add_argument("--log-every", type=int, help=f"metrics.jsonl interval (default {d.log_every})")
    g.add_argument("--sample-every", type=int, help="sample grid interval (default: at the end only)")
    g.add_argument("--ckpt-every", type=int, help=f"checkpoint interval (default {d.ckpt_every}; always at the end)")
    g.add_argument("--sample-n", type=int, help=f"samples per grid (default {d.sample_n})")
    g.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun"],
                   help=f"grid sampler (default {d.sampler}; euler for --objective flow)")
    g.add_argument("--sample-steps", type=int, help=f"grid sampler steps (default {d.sample_steps})")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale for grids (default 1: none)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=cmd_train)


def config_from_args(args):
    """(TrainConfig, the names of the settings this command line chose): the Trainer gives
    every other setting the checkpoint's value on --resume."""
    from .trainer import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.uncond:
        kw["class_cond"] = False
    if not args.learn_sigma:
        kw.pop("learn_sigma", None)
    name, inline = parse_strategy_spec(args.strategy) if args.strategy else (TrainConfig.strategy, {})
    if args.strategy:
        kw["strategy"] = name
    if getattr(args, "objective", None) == "flow":
        # flow strategies (speed_kernels.flow_strategies) check their own parameters when built
        params = {**route_params_unchecked(args.param or [], [name])[name], **inline}
    else:
        params = {**parse_params(args.param or [], [name])[name], **inline}
    if params:
        kw["strategy_params"] = params
    chosen = set(kw)
    return TrainConfig(**kw), chosen


def cmd_train(args) -> int:
    from .trainer import Trainer

    cfg, chosen = config_from_args(args)
    trainer = Trainer(cfg, explicit=chosen)
    try:
        if trainer.is_main:
            b = trainer.backend_info
            print(f"loss backend: {b['resolved']} ({b['reason']})", flush=True)
            if trainer.resumed_from is not None:
                print(f"resuming from {trainer.resume_file} (step {trainer.resumed_from})", flush=True)
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
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `speed-kernels train`, or its run folder "
                   "(the newest readable checkpoint)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun"],
                   help="default ddim (diffusion checkpoints) or euler (flow checkpoints)")
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
    flow = cfg.get("objective", "diffusion") == "flow"
    allowed = ("euler", "heun") if flow else ("ddpm", "ddim")
    args.sampler = args.sampler or allowed[0 if flow else 1]
    if args.sampler not in allowed:
        raise ValueError(f"--sampler {args.sampler}: a {'flow' if flow else 'diffusion'} checkpoint samples with "
                         f"{' or '.join(allowed)}")
    for i, start in enumerate(range(0, args.n, args.batch)):
        n = min(args.batch, args.n - start)
        if flow:
            from .sampling import flow_sample

            shift = float((cfg.get("strategy_params") or {}).get("shift", 1.0))
            chunks.append(flow_sample(model, (n, *shape), sampler=args.sampler, steps=args.steps, shift=shift,
                                      prediction=cfg["prediction"], y=y[start:start + n] if y is not None else None,
                                      guidance=args.guidance, clip=info["data"]["pixel_space"], seed=args.seed + i,
                                      device=device, autocast_dtype=amp).cpu())
            continue
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


def _data_array(spec: str):
    """`analyze --data SPEC`: the images (or latents) of a dataset the trainer reads, as an array."""
    from .data import load_dataset

    return load_dataset(spec, flip=False).images.numpy()


def _add_encode_command(subparsers) -> None:
    from .autoencoder import add_encode_command

    add_encode_command(subparsers)


def add_commands(subparsers) -> None:
    """Register train, sample and compare on a subparsers object."""
    from .compare import add_compare_command

    p = subparsers.add_parser("train", help="train a DiT / U-Net denoiser with a time-step strategy",
                              description="Train a diffusion model with SpeeD (or another strategy) on the fused loss.")
    _train_parser(p)
    p = subparsers.add_parser("sample", help="draw a sample grid from a training checkpoint")
    _sample_parser(p)
    add_compare_command(subparsers)
    _add_encode_command(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="speed-kernels",
                           description="SpeeD time-step sampling and weighting for diffusion training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_analyze_command(sub, data_loader=_data_array)
    add_commands(sub)
    return parser


def main(argv=None) -> int:
    """The `speed-kernels` console entry point (also `python -m speed_train.cli`)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if os.environ.get("SPEED_KERNELS_TRACEBACK") == "1":
            raise
        # One write per line: print() sends the text and its newline in two writes, and under
        # torchrun every rank shares the same stderr pipe, so two ranks' messages could run together.
        sys.stderr.write(f"speed-kernels {args.command}: error: {one_line(exc)}\n")
        sys.stderr.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
