"""Philox4x32-10 and the bits -> uniform -> normal conversion of speed_kernels.rng, in Triton.

Everything here is uint32 arithmetic with wrap-around (one 32x32->64 multiply gives both words
of a Philox product), so the words are bit-identical to the plain-torch oracle; the float
conversions follow rng.py step by step (u = ((x >> 9) * 2 + 1) * 2^-24, Box-Muller with
theta = u * float32(2*pi)). The transcendental functions are our own short forms, written for
the ranges Box-Muller meets (the library sin/cos carry a slow-path range reduction for huge
arguments, and made the kernels compute-bound at large shapes): sin/cos of theta in [0, 2*pi)
by a Cody-Waite reduction to [-pi/4, pi/4] and minimax polynomials (about 1 ulp; eps agrees with
the oracle's torch.sin/cos to float rounding). The log stays the accurate library one: near
u = 1 its relative accuracy decides r.
"""
import triton
import triton.language as tl

# Constants of rng.py (kept as plain ints; triton types ints in [2^31, 2^32) as uint32).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_PI_F32 = tl.constexpr(6.2831854820251465)
TWO_OVER_PI = tl.constexpr(0.6366197723675814)
# pi/2 = PIO2_HI + PIO2_LO; PIO2_HI has 8 significant bits, so k * PIO2_HI (k <= 4) and
# theta - k * PIO2_HI are exact with or without a fused multiply-add (the interpreter has none).
PIO2_HI = tl.constexpr(1.5703125)
PIO2_LO = tl.constexpr(4.8382679489661923e-04)
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + MAGIC rounds x to an integer in the low bits
# minimax fits on [-pi/4, pi/4] (float32 error ~1 ulp):
#   sin y = y + y z (S1 + z (S2 + z S3)),  cos y = 1 - z/2 + z^2 (C2 + z (C3 + z C4)),  z = y^2
SIN_S1 = tl.constexpr(-0.16666653752326965)
SIN_S2 = tl.constexpr(0.0083321463316679)
SIN_S3 = tl.constexpr(-0.00019512853759806603)
COS_C2 = tl.constexpr(0.04166664555668831)
COS_C3 = tl.constexpr(-0.0013887298991903663)
COS_C4 = tl.constexpr(2.4431166821159422e-05)
ONE_MINUS_2_M24 = tl.constexpr(0.999999940395355225)  # 1 - 2^-24, exact in float32
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
        # one widening multiply per product (mul.wide.u32: both words in one instruction)
        p1 = c2.to(tl.uint64) * PHILOX_M1
        p0 = c0.to(tl.uint64) * PHILOX_M0
        c0 = (p1 >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (p0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = p1.to(tl.uint32)
        c3 = p0.to(tl.uint32)
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def bits_to_uniform(x):
    """float32 in (0, 1): ((x >> 9) * 2 + 1) * 2^-24, built without an int -> float conversion:
    v = 1 + (x >> 9) * 2^-23 (the 23 bits as a mantissa), then v - (1 - 2^-24), which is exact
    (the result is a multiple of 2^-24 below 1)."""
    v = ((x >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    return v - ONE_MINUS_2_M24


@triton.jit
def sincos_0_2pi(theta):
    """(sin, cos) of theta in [0, 2*pi]: k = round(theta / (pi/2)) by the magic-number trick
    (its low bits are the quadrant), y = theta - k*pi/2 in [-pi/4, pi/4] (two steps, the first
    exact), the two polynomials, then the quadrant's swap and signs. No branches, no slow path."""
    kb = theta * TWO_OVER_PI + ROUND_MAGIC
    k = kb - ROUND_MAGIC
    q = kb.to(tl.int32, bitcast=True) & 3
    y = (theta - k * PIO2_HI) - k * PIO2_LO
    z = y * y
    s = y + (y * z) * (SIN_S1 + z * (SIN_S2 + z * SIN_S3))
    c = (1.0 - 0.5 * z) + (z * z) * (COS_C2 + z * (COS_C3 + z * COS_C4))
    swap = (q & 1) != 0
    sin_v = tl.where(swap, c, s)
    cos_v = tl.where(swap, s, c)
    sin_v = tl.where((q & 2) != 0, -sin_v, sin_v)
    cos_v = tl.where(((q + 1) & 2) != 0, -cos_v, cos_v)
    return sin_v, cos_v


@triton.jit
def box_muller(u_radius, u_angle):
    """(r*cos, r*sin) with r = sqrt(-2 ln u_radius), angle = u_angle * float32(2*pi)."""
    r2 = -2.0 * tl.log(u_radius)  # > 0: u < 1 - 2^-25
    r = r2 * tl.math.rsqrt(r2)  # ~1 ulp, one special-function op (no slow-path branch)
    sin_v, cos_v = sincos_0_2pi(u_angle * TWO_PI_F32)
    return r * cos_v, r * sin_v


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
