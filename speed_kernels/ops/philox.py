"""Philox4x32-10 and the bits -> uniform -> normal conversion of speed_kernels.rng, in Triton.

Everything here is uint32 arithmetic with wrap-around (tl.umulhi for the high word), so the
words are bit-identical to the plain-torch oracle; the float conversions follow rng.py step by
step (u = ((x >> 9) * 2 + 1) * 2^-24, Box-Muller with float32(2*pi)).
"""
import triton
import triton.language as tl

# Constants of rng.py (kept as plain ints; triton types ints in [2^31, 2^32) as uint32).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_PI_F32 = tl.constexpr(6.2831854820251465)
INV_2_24 = tl.constexpr(5.9604644775390625e-08)  # 2^-24, exact
STREAM_T = tl.constexpr(0)
STREAM_EPS = tl.constexpr(1)


def split_key(k: int) -> int:
    """A 32-bit key word as a signed int32 Python int, so Triton always types the kernel
    argument as i32 (no recompiles across seeds); the kernel bitcasts it back to uint32."""
    k &= 0xFFFFFFFF
    return k - (1 << 32) if k >= (1 << 31) else k


@triton.jit
def as_u32(x):
    """Low 32 bits of an integer scalar/tensor as uint32 (int64 -> truncate, int32 -> bitcast)."""
    if x.dtype == tl.int64 or x.dtype == tl.uint64:
        return (x & 0xFFFFFFFF).to(tl.uint32)
    else:
        return x.to(tl.uint32, bitcast=True)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 counters (any broadcastable shapes) and uint32 key words."""
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, tl.full(_c2.shape, PHILOX_M1, tl.uint32)) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, tl.full(_c0.shape, PHILOX_M0, tl.uint32)) ^ c3 ^ k1
        c1 = tl.mul(_c2, PHILOX_M1, sanitize_overflow=False)
        c3 = tl.mul(_c0, PHILOX_M0, sanitize_overflow=False)
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def bits_to_uniform(x):
    """float32 in (0, 1): ((x >> 9) * 2 + 1) * 2^-24 (< 2^24, so the int -> float cast is exact)."""
    m = ((x >> 9) * 2 + 1).to(tl.int32, bitcast=True)
    return m.to(tl.float32) * INV_2_24


@triton.jit
def box_muller(u_radius, u_angle):
    """(r*cos, r*sin) with r = sqrt(-2 ln u_radius), angle = u_angle * float32(2*pi)."""
    r = tl.sqrt_rn(-2.0 * tl.log(u_radius))
    theta = u_angle * TWO_PI_F32
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def timestep_uniform(sample, call_u32, k0, k1):
    """The t-draw uniform of one sample (scalar): word 0 of philox(0, sample, call, STREAM_T)."""
    zero = tl.zeros_like(call_u32)
    w0, _w1, _w2, _w3 = philox4x32_10(zero, as_u32(sample), call_u32, zero + STREAM_T, k0, k1)
    return bits_to_uniform(w0)


@triton.jit
def normal4(group, sample, call_u32, k0, k1):
    """The four normals of element group `group` (uint32 tensor) of `sample` (lanes 0..3)."""
    zero = tl.zeros_like(group)
    w0, w1, w2, w3 = philox4x32_10(group, zero + as_u32(sample), zero + call_u32, zero + STREAM_EPS, k0, k1)
    n0, n1 = box_muller(bits_to_uniform(w0), bits_to_uniform(w1))
    n2, n3 = box_muller(bits_to_uniform(w2), bits_to_uniform(w3))
    return n0, n1, n2, n3


@triton.jit
def inverse_cdf(cdf_ptr, u, T, NITER: tl.constexpr):
    """#{k : cdf[k] <= u}, clamped to T-1: a branch-free upper-bound search in NITER =
    T.bit_length() steps (the count at least halves each step; empty steps are no-ops)."""
    first = T * 0  # same int type as T
    count = first + T
    for _ in tl.static_range(NITER):
        step = count // 2
        it = first + step
        c = tl.load(cdf_ptr + it, mask=count > 0, other=float("inf"))
        right = c <= u
        first = tl.where(right, it + 1, first)
        count = tl.where(right, count - step - 1, step)
    return tl.minimum(first, T - 1)
