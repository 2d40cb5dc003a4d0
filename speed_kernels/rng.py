"""The random-number contract every backend follows, written in plain torch integer arithmetic.

This module is the oracle: the Triton, CUDA and C++ backends must give the same t bit for bit
and the same eps to float rounding. The contract:

* Generator: Philox4x32-10 (Salmon et al. 2011, Random123), 10 rounds.
* Key: the loss object's 64-bit seed with the rank folded in (``fold_key``), split as
  ``k0 = low 32 bits``, ``k1 = high 32 bits``.
* Counter words ``(c0, c1, c2, c3) = (element group, sample index, call index, stream id)``.
  ``call index`` is the number of noise calls made before this one (kept in a device tensor);
  ``stream id`` is ``STREAM_T`` for the time-step draw and ``STREAM_EPS`` for the noise.
* Time step of sample i: word 0 of ``philox(0, i, call, STREAM_T)`` turned into a uniform u
  (below), then ``t = #{k : cdf[k] <= u}`` (clamped to T-1), with ``cdf`` a float32 table.
  Both u and cdf are exact float32 values, so every backend makes the same comparisons.
* Noise of element j (flat index inside a sample) of sample i: the four words of
  ``philox(j // 4, i, call, STREAM_EPS)`` become uniforms u0..u3 and two Box-Muller pairs:
  lane 0 = r01*cos(2*pi*u1), lane 1 = r01*sin(2*pi*u1), lane 2 = r23*cos(2*pi*u3),
  lane 3 = r23*sin(2*pi*u3), with r01 = sqrt(-2 ln u0), r23 = sqrt(-2 ln u2); lane = j % 4.
* Uniform from a 32-bit word x: ``u = ((x >> 9) * 2 + 1) * 2**-24``: an odd multiple of 2^-24,
  exact in float32, strictly inside (0, 1) (so ln u is finite), 23 bits of resolution.
  Sampling probabilities below ~1e-7 are therefore not resolved; no strategy here needs them.
"""
from __future__ import annotations


import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
# Golden-ratio multiplier: folds the rank into the key so ranks get unrelated streams,
# while rank 0 keeps the plain seed.
RANK_FOLD = 0x9E3779B97F4A7C15

STREAM_T = 0
STREAM_EPS = 1

TWO_PI_F32 = 6.2831854820251465  # float32(2*pi), spelled out so every backend uses the same value


def fold_key(seed: int, rank: int = 0) -> tuple[int, int]:
    """(k0, k1) of the Philox key for a 64-bit seed and a distributed rank."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    key = (seed ^ ((rank * RANK_FOLD) & MASK64)) & MASK64
    return key & MASK32, key >> 32


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of m * x for x in [0, 2^32), without overflowing int64:
    split x in 16-bit halves so every partial product stays under 2^48."""
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    p_lo = m * x_lo
    mid = m * x_hi + (p_lo >> 16)  # < 2^48 + 2^32
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding unsigned 32-bit values (broadcast together).

    Returns four int64 tensors with values in [0, 2^32)."""
    # Python ints become tensors on the device of the tensor arguments (CPU if there are none).
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)
    c0, c1, c2, c3 = torch.broadcast_tensors(
        *[torch.as_tensor(c, dtype=torch.int64, device=device) for c in (c0, c1, c2, c3)]
    )
    c0, c1, c2, c3 = (c & MASK32 for c in (c0, c1, c2, c3))
    k0 &= MASK32
    k1 &= MASK32
    for r in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r != PHILOX_ROUNDS - 1:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def bits_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """float32 uniform in (0, 1) from 32-bit words (int64 tensor): ((x >> 9)*2 + 1) * 2^-24."""
    return ((x >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)


def box_muller(u_radius: torch.Tensor, u_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent standard normals (cos and sin lanes), computed in float32."""
    r = torch.sqrt(-2.0 * torch.log(u_radius))
    theta = u_angle * TWO_PI_F32
    return r * torch.cos(theta), r * torch.sin(theta)


def uniform_per_sample(sample_idx: torch.Tensor, call: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """The time-step uniform of each sample index for the given call index (float32)."""
    w0, _, _, _ = philox4x32(0, sample_idx, call, STREAM_T, k0, k1)
    return bits_to_uniform(w0)


def normal_per_element(
    batch: int, n_per_sample: int, call: torch.Tensor, k0: int, k1: int, device=None
) -> torch.Tensor:
    """eps as a float32 [batch, n_per_sample] tensor (the reference; memory-hungry by design)."""
    device = call.device if device is None else device
    n_groups = (n_per_sample + 3) // 4
    groups = torch.arange(n_groups, dtype=torch.int64, device=device).view(1, -1)
    samples = torch.arange(batch, dtype=torch.int64, device=device).view(-1, 1)
    w = philox4x32(groups, samples, call.reshape(()).to(device), STREAM_EPS, k0, k1)
    u = [bits_to_uniform(x) for x in w]
    n0, n1 = box_muller(u[0], u[1])
    n2, n3 = box_muller(u[2], u[3])
    eps = torch.stack([n0, n1, n2, n3], dim=-1).reshape(batch, n_groups * 4)
    return eps[:, :n_per_sample]


def sample_timesteps(
    batch: int,
    cdf: torch.Tensor,
    call: torch.Tensor,
    k0: int,
    k1: int,
    mirror: bool = False,
    pivot: int = 0,
) -> torch.Tensor:
    """t (int64 [batch]) by inverse CDF of the float32 table `cdf`; with `mirror`, the official
    SpeeD half batch: B//2+1 draws, the rest their mirror |t - pivot|."""
    n_draw = batch // 2 + 1 if mirror else batch
    idx = torch.arange(batch, dtype=torch.int64, device=cdf.device)
    src = torch.where(idx < n_draw, idx, idx - n_draw)
    u = uniform_per_sample(src, call.reshape(()).to(cdf.device), k0, k1)
    t = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)
    if mirror:
        t = torch.where(idx < n_draw, t, (t - pivot).abs())
    return t


def uniform_cdf_of(probs: torch.Tensor) -> torch.Tensor:
    """float32 CDF table from float64 probabilities: cumsum in float64, last entry exactly 1."""
    cdf = torch.cumsum(probs.to(torch.float64), 0)
    cdf = cdf / cdf[-1]
    cdf = cdf.to(torch.float32)
    cdf = torch.cummax(cdf, 0).values  # monotone after rounding
    cdf[-1] = 1.0
    return cdf


__all__ = [
    "fold_key",
    "philox4x32",
    "bits_to_uniform",
    "box_muller",
    "uniform_per_sample",
    "normal_per_element",
    "sample_timesteps",
    "uniform_cdf_of",
    "STREAM_T",
    "STREAM_EPS",
    "TWO_PI_F32",
]
