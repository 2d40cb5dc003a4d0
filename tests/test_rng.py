"""The RNG contract: Philox known answers, the uniform and normal conversions, t's distribution."""
import random

import numpy as np
import pytest
import torch
from scipy import stats

from speed_kernels import rng

# Published Philox4x32-10 known-answer vectors (Random123 kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expect", KAT)
def test_philox_known_answers(ctr, key, expect):
    out = rng.philox4x32(*[torch.tensor(c) for c in ctr], *key)
    assert tuple(int(x) for x in out) == expect


def test_mulhilo_matches_python_integers():
    r = random.Random(1)
    xs = [r.getrandbits(32) for _ in range(1000)] + [0, 1, 0xFFFFFFFF]
    for m in (rng.PHILOX_M0, rng.PHILOX_M1):
        hi, lo = rng._mulhilo(m, torch.tensor(xs, dtype=torch.int64))
        for x, h, l in zip(xs, hi.tolist(), lo.tolist()):
            assert (h, l) == ((m * x) >> 32, (m * x) & 0xFFFFFFFF)


def test_uniform_is_exact_and_open():
    x = torch.tensor([0, 1, 511, 512, 0xFFFFFFFF, 0x80000000], dtype=torch.int64)
    u = rng.bits_to_uniform(x)
    assert u.dtype == torch.float32
    expect = [((v >> 9) * 2 + 1) / 2**24 for v in x.tolist()]
    assert u.double().tolist() == expect  # exact in float32
    assert (u > 0).all() and (u < 1).all()


def test_fold_key():
    assert rng.fold_key(0x1234_5678_9ABC_DEF0, 0) == (0x9ABCDEF0, 0x12345678)
    keys = {rng.fold_key(7, r) for r in range(64)}
    assert len(keys) == 64
    with pytest.raises(ValueError, match="rank"):
        rng.fold_key(1, -1)
    with pytest.raises(TypeError, match="seed"):
        rng.fold_key(1.5)


def test_eps_moments_and_normality():
    call = torch.tensor(3)
    eps = rng.normal_per_element(64, 1000, call, 11, 22)
    assert eps.shape == (64, 1000) and eps.dtype == torch.float32
    flat = eps.double().flatten()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / n**0.5
    assert abs(flat.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-4
    # lanes are independent of each other: correlation of neighbouring elements near zero
    corr = np.corrcoef(flat.numpy()[0::2], flat.numpy()[1::2])[0, 1]
    assert abs(corr) < 5 / (n / 2) ** 0.5


def test_eps_streams_differ_by_call_key_and_stream():
    a = rng.normal_per_element(4, 64, torch.tensor(0), 1, 2)
    assert not torch.equal(a, rng.normal_per_element(4, 64, torch.tensor(1), 1, 2))
    assert not torch.equal(a, rng.normal_per_element(4, 64, torch.tensor(0), 1, 3))
    assert torch.equal(a, rng.normal_per_element(4, 64, torch.tensor(0), 1, 2))
    # element j of a short sample is the prefix of a longer one: offsets do not depend on size
    b = rng.normal_per_element(4, 200, torch.tensor(0), 1, 2)
    assert torch.equal(a, b[:, :64])


def test_t_follows_the_table_chi_square():
    T = 50
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(T, generator=g, dtype=torch.float64) ** 2
    probs[7] = 0.0  # a zero-probability step is never drawn
    probs /= probs.sum()
    cdf = rng.uniform_cdf_of(probs)
    counts = torch.zeros(T, dtype=torch.float64)
    for call in range(20):
        t = rng.sample_timesteps(4096, cdf, torch.tensor(call), 5, 6)
        counts += torch.bincount(t, minlength=T).double()
    assert counts[7] == 0
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum().item()
    assert stats.chi2.sf(chi2, int(keep.sum()) - 1) > 1e-4


def test_mirror_half_batch():
    T, B, pivot = 1000, 9, 642
    cdf = rng.uniform_cdf_of(torch.ones(T, dtype=torch.float64))
    t = rng.sample_timesteps(B, cdf, torch.tensor(0), 1, 2, mirror=True, pivot=pivot)
    n_draw = B // 2 + 1
    drawn = rng.sample_timesteps(n_draw, cdf, torch.tensor(0), 1, 2)
    assert torch.equal(t[:n_draw], drawn)
    assert torch.equal(t[n_draw:], (drawn[: B - n_draw] - pivot).abs())


def test_cdf_table_is_monotone_and_ends_at_one():
    probs = torch.full((1000,), 1e-9, dtype=torch.float64)
    probs[0] = 1.0
    cdf = rng.uniform_cdf_of(probs)
    assert cdf.dtype == torch.float32 and cdf[-1] == 1.0
    assert (cdf[1:] >= cdf[:-1]).all()
