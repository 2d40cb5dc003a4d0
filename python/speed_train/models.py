"""Denoisers for the training engine: DiT (Peebles & Xie 2023) and a DDPM/ADM-style U-Net.

Both are written here, compactly, rather than taken from diffusers or timm: the engine
must install light and work offline, and these two architectures fit in a few hundred
lines. The DiT follows facebookresearch/DiT (adaLN-Zero blocks, patchify, fixed 2-D
sin-cos position embedding, timestep + class embedding with label dropout for
classifier-free guidance, zero-initialised modulation and output layer), so its
configurations and parameter counts match the paper's. The U-Net follows guided-diffusion
(residual blocks with a time embedding, GroupNorm, self-attention at low resolution).

Every model is called as ``model(x, t, y=None)`` with x [N, C, H, W], t [N] integer steps,
y [N] class labels or None, and returns [N, C_out, H, W] with C_out = 2C when
``learn_sigma`` (the second half is DiT's interpolation value for the learned variance).
Class-conditional models own one extra "null" class (index ``num_classes``) used when y
is None and for guidance.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DiT", "UNet", "build_model", "MODEL_CONFIGS", "model_names", "count_params", "apply_training_recipe"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) time steps, as in DiT / guided-diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row for the null class. In training, labels are
    replaced by the null class with probability `dropout` (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y, batch: int, device):
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        elif self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


# ----------------------------------------------------------------------------- DiT


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (MAE / DiT)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    # DiT's order: w first, then h (kept so published checkpoints' layout would match)
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    def __init__(self, image_size=32, patch_size=2, in_channels=4, hidden=1152, depth=28, heads=16,
                 mlp_ratio=4.0, num_classes=1000, class_dropout=0.1, learn_sigma=True):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by the patch size {patch_size}")
        if hidden % heads or hidden % 4:
            raise ValueError(f"hidden {hidden} must be divisible by heads {heads} and by 4")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch = patch_size
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.grid = image_size // patch_size
        self.x_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.t_embed = TimestepEmbedder(hidden)
        self.y_embed = LabelEmbedder(num_classes, hidden, class_dropout) if num_classes > 0 else None
        self.register_buffer(
            "pos_embed", torch.from_numpy(sincos_pos_embed_2d(hidden, self.grid)).float().unsqueeze(0),
            persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final = nn.Linear(hidden, patch_size * patch_size * self.out_channels)
        self._init_weights()

    def _init_weights(self):
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(basic)
        w = self.x_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.table.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN[-1].weight)
            nn.init.zeros_(blk.adaLN[-1].bias)
        for m in (self.final_adaLN[-1], self.final):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x):
        N, p, g, c = x.shape[0], self.patch, self.grid, self.out_channels
        x = x.reshape(N, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(N, c, g * p, g * p)

    def forward(self, x, t, y=None):
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embed(t)
        if self.y_embed is not None:
            c = c + self.y_embed(y, x.shape[0], x.device)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        return self.unpatchify(self.final(modulate(self.final_norm(h), shift, scale)))


# ----------------------------------------------------------------------------- U-Net


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding as scale/shift of the second norm
    (ADM's use_scale_shift_norm), zero-initialised last conv so it starts as identity."""

    def __init__(self, cin, cout, emb_dim, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch, heads=4):
        super().__init__()
        self.heads = heads if ch % heads == 0 else 1
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    def __init__(self, image_size=32, in_channels=3, ch=64, ch_mult=(1, 2, 2), num_res=2, attn_max_res=16,
                 dropout=0.0, num_classes=0, class_dropout=0.1, learn_sigma=False, heads=4):
        super().__init__()
        levels = len(ch_mult)
        if image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size {image_size} must be divisible by {2 ** (levels - 1)} for this U-Net")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.ch = ch
        emb = ch * 4
        self.t_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.y_embed = LabelEmbedder(num_classes, emb, class_dropout) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # attention only below full resolution (cost grows with (HW)^2) and at <= attn_max_res
        def use_attn(res):
            return res <= attn_max_res and res < image_size

        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, image_size
        for i, m in enumerate(ch_mult):
            for _ in range(num_res):
                layers = [ResBlock(cur, ch * m, emb, dropout)]
                cur = ch * m
                if use_attn(res):
                    layers.append(AttnBlock(cur, heads))
                self.down.append(nn.ModuleList(layers))
                skips.append(cur)
            if i < levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb, dropout), AttnBlock(cur, heads), ResBlock(cur, cur, emb, dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for j in range(num_res + 1):
                layers = [ResBlock(cur + skips.pop(), ch * m, emb, dropout)]
                cur = ch * m
                if use_attn(res):
                    layers.append(AttnBlock(cur, heads))
                if i > 0 and j == num_res:
                    layers.append(_Upsample(cur))
                    res *= 2
                self.up.append(nn.ModuleList(layers))
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = nn.Conv2d(cur, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(layers, h, emb):
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, (ResBlock, AttnBlock)) else layer(h)
        return h

    def forward(self, x, t, y=None):
        emb = self.t_embed(timestep_embedding(t, self.ch))
        if self.y_embed is not None:
            emb = emb + self.y_embed(y, x.shape[0], x.device)
        h = self.conv_in(x)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----------------------------------------------------------------------------- factory

_DIT = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, hidden, heads

MODEL_CONFIGS: dict[str, tuple[type, dict]] = {
    f"DiT-{size}/{p}": (DiT, dict(depth=d, hidden=h, heads=n, patch_size=p))
    for size, (d, h, n) in _DIT.items() for p in (2, 4, 8)
}
MODEL_CONFIGS.update({
    # CPU-sized DiT: on 8x8 digits patch 2 gives 16 tokens
    "DiT-tiny": (DiT, dict(depth=6, hidden=192, heads=3, patch_size=2)),
    # a third of DiT-tiny's parameters, ~2.4x faster: the latent regime's run fits 10 CPU minutes
    "DiT-mini": (DiT, dict(depth=4, hidden=128, heads=4, patch_size=2)),
    # the same model on 32x32 pixels: patch 4 gives 64 tokens (fmnist-pixel's CPU profile)
    "DiT-mini/4": (DiT, dict(depth=4, hidden=128, heads=4, patch_size=4)),
    # a step so small that the host path (loss, optimizer launches) is most of it: benchmarks/tests
    "DiT-micro": (DiT, dict(depth=1, hidden=64, heads=2, patch_size=2)),
    "unet-tiny": (UNet, dict(ch=32, ch_mult=(1, 2), num_res=1, attn_max_res=8)),
    # about 6M parameters at 32x32: the "small U-Net" of REFERENCE.md's Fashion-MNIST runs
    "unet-small": (UNet, dict(ch=64, ch_mult=(1, 2, 2), num_res=2, attn_max_res=16)),
    "unet-base": (UNet, dict(ch=128, ch_mult=(1, 2, 2, 2), num_res=2, attn_max_res=16, dropout=0.1)),
})


def model_names() -> list[str]:
    return list(MODEL_CONFIGS)


def build_model(name: str, in_channels: int, image_size: int, num_classes: int = 0,
                learn_sigma: bool = False, class_dropout: float = 0.1) -> nn.Module:
    """Instantiate a named configuration. num_classes=0 makes an unconditional model."""
    key = {k.lower(): k for k in MODEL_CONFIGS}.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_CONFIGS)}")
    cls, kw = MODEL_CONFIGS[key]
    return cls(image_size=image_size, in_channels=in_channels, num_classes=num_classes,
               learn_sigma=learn_sigma, class_dropout=class_dropout, **kw)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def apply_training_recipe(model: nn.Module, device, channels_last: bool = False) -> nn.Module:
    """The fast paths a modern trainer turns on, in one place (attention already runs through
    scaled_dot_product_attention; the trainer builds a fused AdamW on CUDA):

    * TF32 for float32 matmuls and convolutions on CUDA (what autocast leaves in float32);
    * channels-last weights for convolutional models when asked (`channels_last=True`): cuDNN's
      NHWC kernels are faster for most convolutions, but GroupNorm-heavy U-Nets do not always gain,
      so it is opt-in until benchmarks/bench_train.py --channels-last says otherwise on a card.

    Returns the model (moved in place to the memory format; values unchanged)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model
