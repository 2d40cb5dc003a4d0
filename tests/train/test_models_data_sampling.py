"""Models (shapes, configs), datasets and their order, samplers."""
import math
import os

import numpy as np
import pytest
import torch

from speed_train import data as D
from speed_train import models as M
from speed_train import sampling as S


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models gain little from a second thread, and on a loaded machine OpenMP threads
    # that wait for each other make these tests many times slower; restore afterwards
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name,C,size", [("DiT-tiny", 1, 8), ("DiT-mini", 4, 8), ("DiT-S/8", 4, 16), ("unet-tiny", 1, 8),
                                         ("unet-tiny", 3, 32), ("unet-small", 1, 32)])
@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("classes", [0, 10])
def test_model_output_shapes(name, C, size, learn_sigma, classes):
    torch.manual_seed(0)
    m = M.build_model(name, C, size, num_classes=classes, learn_sigma=learn_sigma)
    x, t = torch.randn(3, C, size, size), torch.tensor([0, 500, 999])
    y = torch.tensor([1, 2, 3]) if classes else None
    out = m(x, t, y=y)
    assert out.shape == (3, 2 * C if learn_sigma else C, size, size)
    assert torch.isfinite(out).all()


def test_models_respond_to_inputs_once_trained_a_little():
    # zero-initialised outputs are 0 at first; after one SGD step output depends on x, t and y
    for name in ("DiT-tiny", "unet-tiny"):
        torch.manual_seed(0)
        m = M.build_model(name, 1, 8, num_classes=10)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        x = torch.randn(8, 1, 8, 8)
        t = torch.randint(0, 1000, (8,))
        y = torch.randint(0, 10, (8,))
        for _ in range(3):
            opt.zero_grad()
            ((m(x, t, y) - x) ** 2).mean().backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            base = m(x, t, y)
            assert not torch.allclose(base, m(x, (t + 300) % 1000, y)), name
            assert not torch.allclose(base, m(x, t, (y + 1) % 10)), name
            assert not torch.allclose(base, m(x, t, None)), name  # null class


def test_dit_configs_match_paper():
    with torch.device("meta"):
        xl = M.build_model("DiT-XL/2", 4, 32, num_classes=1000, learn_sigma=True)
        s = M.build_model("DiT-S/2", 4, 32, num_classes=1000, learn_sigma=True)
    assert abs(M.count_params(xl) / 675e6 - 1) < 0.005  # the paper's 675M
    assert abs(M.count_params(s) / 33e6 - 1) < 0.02  # 33M
    assert {"DiT-S/2", "DiT-B/4", "DiT-L/8", "DiT-XL/2", "DiT-tiny", "DiT-mini", "unet-tiny", "unet-small"} <= set(M.model_names())


def test_dit_mini_patch4_on_32px_pixels():
    # fmnist-pixel's CPU model: 64 tokens of 4x4 pixels, output shaped like its input
    m = M.build_model("DiT-mini/4", 1, 32, num_classes=0, learn_sigma=False)
    x = torch.randn(2, 1, 32, 32)
    out = m(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert m.pos_embed.shape[1] == 64


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="unknown model 'DiT-Q/2'.*DiT-XL/2.*unet-small"):
        M.build_model("DiT-Q/2", 1, 8)
    with pytest.raises(ValueError, match="divisible"):
        M.build_model("DiT-S/8", 1, 12)


# ----------------------------------------------------------------------------- data


def test_digits():
    d = D.load_dataset("digits")
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.float32
    assert d.images.min() == -1 and d.images.max() == 1
    assert set(d.labels.tolist()) == set(range(10)) and d.num_classes == 10
    assert d.flip is False and d.pixel_space
    assert D.load_dataset("digits", image_size=16).images.shape == (1797, 1, 16, 16)


def test_arrays(tmp_path):
    lat = np.random.default_rng(0).normal(size=(20, 4, 8, 8)).astype(np.float32) * 3
    np.savez(tmp_path / "lat.npz", latents=lat, labels=np.arange(20) % 5)
    d = D.load_dataset(str(tmp_path / "lat.npz"))
    assert torch.equal(d.images, torch.from_numpy(lat))  # latents taken as they are
    assert d.num_classes == 5 and d.labels.tolist()[:6] == [0, 1, 2, 3, 4, 0]
    assert not d.pixel_space and not d.flip
    np.save(tmp_path / "img.npy", np.full((3, 1, 4, 4), 255, dtype=np.uint8))
    d = D.load_dataset(str(tmp_path / "img.npy"))
    assert d.pixel_space and d.labels is None and torch.all(d.images == 1.0)
    np.save(tmp_path / "bad.npy", np.zeros((3, 1, 4, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="square"):
        D.load_dataset(str(tmp_path / "bad.npy"))


def test_image_folder(tmp_path):
    from PIL import Image

    for cls, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40 + 10 * i, 30), color).save(tmp_path / cls / f"{i}.png")
    d = D.load_dataset(str(tmp_path), image_size=16)
    assert d.images.shape == (6, 3, 16, 16) and d.num_classes == 2
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(d.images[0, :, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(d.images[5, :, 8, 8], torch.tensor([-1.0, -1.0, 1.0]))
    assert d.flip
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        D.load_dataset(str(empty))


def test_missing_dataset_path():
    with pytest.raises(FileNotFoundError, match="not found"):
        D.load_dataset("/nonexistent/where")


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEED_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        D.load_dataset("fashion-mnist")


@pytest.mark.skipif(not os.path.exists(D.FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_installed():
    d = D.load_dataset("fashion-mnist", split="test")
    assert d.images.shape == (10000, 1, 32, 32) and d.num_classes == 10
    assert d.images[:, :, :2].max() == -1  # the padding is background
    assert -1 <= d.images.min() and d.images.max() <= 1 and d.images.max() == 1


def test_order_is_seeded_resumable_and_sharded():
    d = D.load_dataset("digits", flip=True)
    a = D.DataOrder(d, 500, seed=3)
    seq = [a.next_indices() for _ in range(8)]  # crosses epoch boundaries (1797 / 500)
    assert a.epoch == 2
    b = D.DataOrder(d, 500, seed=3)
    for _ in range(5):
        b.next_indices()
    c = D.DataOrder(d, 500, seed=3)
    c.load_state_dict(b.state_dict())
    for k in range(5, 8):
        i, f = c.next_indices()
        assert torch.equal(i, seq[k][0]) and torch.equal(f, seq[k][1])
    # an epoch visits each example once; another seed gives another order
    first_epoch = torch.cat([s[0] for s in seq])[:1797]
    assert torch.equal(first_epoch.sort().values, torch.arange(1797))
    assert not torch.equal(D.DataOrder(d, 500, seed=4).next_indices()[0], seq[0][0])
    # ranks read disjoint shards of the same permutation
    r0 = D.DataOrder(d, 100, seed=3, rank=0, world_size=2)
    r1 = D.DataOrder(d, 100, seed=3, rank=1, world_size=2)
    i0, i1 = r0.next_indices()[0], r1.next_indices()[0]
    assert not set(i0.tolist()) & set(i1.tolist())
    assert torch.equal(torch.stack([i0, i1], 1).reshape(-1), seq[0][0][:200])
    # flips applied per the drawn bits
    x, _ = D.DataOrder(d, 64, seed=3).next_batch()
    idx, flips = D.DataOrder(d, 64, seed=3).next_indices()
    ref = torch.where(flips.view(-1, 1, 1, 1), d.images[idx].flip(-1), d.images[idx])
    assert flips.any() and torch.equal(x, ref)


# ----------------------------------------------------------------------------- sampling


class _Oracle(torch.nn.Module):
    """The exact denoiser of a one-point data set {c}: knows x0, returns the prediction."""

    def __init__(self, c, ac, prediction, learn_sigma=False):
        super().__init__()
        self.c, self.prediction, self.learn_sigma = c, prediction, learn_sigma
        self.register_buffer("ac", ac.float())
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        a = self.ac[t].view(-1, 1, 1, 1)
        x0 = self.c.expand_as(x)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]
        if self.learn_sigma:
            out = torch.cat([out, torch.zeros_like(out)], 1)
        return out


def _schedule():
    from speed_kernels import NoiseSchedule

    return NoiseSchedule.linear(T=1000)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_recover_the_data_with_an_exact_denoiser(prediction, sampler):
    sched = _schedule()
    c = torch.linspace(-0.8, 0.8, 16).view(1, 1, 4, 4)
    model = _Oracle(c, sched.alphas_cumprod, prediction, learn_sigma=sampler == "ddpm")
    x = S.sample(model, sched, (5, 1, 4, 4), sampler=sampler, steps=20, prediction=prediction,
                 learn_sigma=model.learn_sigma, seed=1)
    assert torch.allclose(x, c.expand_as(x), atol=1e-3)


class _TwoPointOracle(torch.nn.Module):
    """The exact denoiser (posterior mean of x0 given x_t) of the two-point data set {c, -c}."""

    def __init__(self, c, ac, prediction, learn_sigma=False):
        super().__init__()
        self.c, self.prediction, self.learn_sigma = c.double(), prediction, learn_sigma
        self.register_buffer("ac", ac.double())
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        a = self.ac[t].view(-1, 1, 1, 1)
        xd = x.double()
        # log-likelihood of x_t under each point: -|x_t - sqrt(a) c_k|^2 / (2 (1 - a))
        ll = torch.stack([-((xd - a.sqrt() * k * self.c) ** 2).flatten(1).sum(1) for k in (1, -1)], 1)
        w = torch.softmax(ll / (2 * (1 - a.view(-1, 1))), dim=1)
        x0 = (w[:, 0] - w[:, 1]).view(-1, 1, 1, 1) * self.c
        eps = (xd - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]
        if self.learn_sigma:
            out = torch.cat([out, torch.zeros_like(out)], 1)
        return out.float()


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_land_on_the_data_of_a_two_point_set(prediction, sampler):
    """With the exact denoiser of {c, -c} every sample ends on one of the two points and both
    occur: unlike one-point data, the final step cannot return the right x0 whatever came before."""
    sched = _schedule()
    c = torch.linspace(-0.8, 0.8, 16).view(1, 1, 4, 4)
    model = _TwoPointOracle(c, sched.alphas_cumprod, prediction, learn_sigma=sampler == "ddpm")
    x = S.sample(model, sched, (16, 1, 4, 4), sampler=sampler, steps=25, prediction=prediction,
                 learn_sigma=model.learn_sigma, seed=4)
    d_plus = (x - c).flatten(1).abs().amax(1)
    d_minus = (x + c).flatten(1).abs().amax(1)
    assert (torch.minimum(d_plus, d_minus) < 1e-3).all(), torch.minimum(d_plus, d_minus)
    assert (d_plus < 1e-3).any() and (d_minus < 1e-3).any()


class _Recorder(torch.nn.Module):
    """A fixed smooth function of (x, t) (prediction channels, and variance values in (-1, 1)
    with learned sigma) that records every input it sees."""

    def __init__(self, C, learn_sigma):
        super().__init__()
        g = torch.Generator().manual_seed(17)
        self.a = torch.randn(1, C, 4, 4, generator=g) * 0.3
        self.b = torch.randn(1, C, 4, 4, generator=g)
        self.learn_sigma = learn_sigma
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append((x.clone(), t.clone()))
        ph = (t.float() / 300.0).view(-1, 1, 1, 1)
        out = self.a * x + 0.5 * self.b * torch.sin(ph)
        if self.learn_sigma:
            out = torch.cat([out, torch.tanh(self.b * x + torch.cos(ph))], 1)
        return out


def _independent_step(x, out, C, s_now, s_prev, ac, sampler, prediction, learn_sigma, clip, noise):
    """One reverse step written from the definitions, in float64: x0 and eps from the prediction;
    DDIM (eta = 0) moves along eps; DDPM draws from the Gaussian posterior q(x_prev | x_t, x0)
    obtained by conditioning (precision = 1/(1 - ab_prev) + alpha/beta), with the model variance
    exp(f log beta + (1 - f) log beta~) (learned range, beta~ at the first step replaced by the
    second's) or beta~ (fixed small). s_now / s_prev: original step indices (s_prev None: last)."""
    x = x.double()
    out = out.double()
    a = float(ac[s_now])
    a_prev = float(ac[s_prev]) if s_prev is not None else 1.0
    pred = out[:, :C]
    if prediction == "eps":
        x0 = (x - math.sqrt(1 - a) * pred) / math.sqrt(a)
    elif prediction == "v":
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * pred
    else:
        x0 = pred
    if clip:
        x0 = x0.clamp(-1, 1)
    eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    if sampler == "ddim":
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    if s_prev is None:
        return x0  # the posterior at the last step is a point mass at x0
    alpha = a / a_prev  # the respaced step's 1 - beta
    beta = 1 - alpha
    prec = 1 / (1 - a_prev) + alpha / beta
    var = 1 / prec
    mean = var * (math.sqrt(a_prev) * x0 / (1 - a_prev) + math.sqrt(alpha) * x / beta)
    if learn_sigma:
        f = (out[:, C:].clamp(-1, 1) + 1) / 2
        logvar = f * math.log(beta) + (1 - f) * math.log(var)
        std = torch.exp(0.5 * logvar)
    else:
        std = math.sqrt(var)
    return mean + std * noise.double()


CHAIN_CASES = [("ddim", "eps", False, True), ("ddim", "v", False, False), ("ddpm", "eps", False, False),
               ("ddpm", "eps", True, False), ("ddpm", "v", True, True), ("ddpm", "x0", True, False)]


@pytest.mark.parametrize("sampler,prediction,learn_sigma,clip", CHAIN_CASES)
def test_every_sampler_step_matches_an_independent_step(sampler, prediction, learn_sigma, clip):
    """Each intermediate step of the respaced chain (the x the model sees next) against a step
    written from the definitions; the respacing (which original t the model sees) too."""
    sched = _schedule()
    ac = sched.alphas_cumprod.double()
    T, steps, shape, seed = 1000, 7, (3, 2, 4, 4), 9
    model = _Recorder(shape[1], learn_sigma)
    final = S.sample(model, sched, shape, sampler=sampler, steps=steps, prediction=prediction,
                     learn_sigma=learn_sigma, clip=clip, seed=seed)
    use = sorted({int(round(i * (T - 1) / (steps - 1))) for i in range(steps)})  # evenly spaced, 0 and T-1
    seen_t = [int(t[0]) for _, t in model.seen]
    assert seen_t == use[::-1]
    gen = torch.Generator().manual_seed(seed)
    x_first = torch.randn(shape, generator=gen)
    torch.testing.assert_close(model.seen[0][0], x_first)
    xs = [x for x, _ in model.seen] + [final]
    for k, s_now in enumerate(use[::-1]):
        s_prev = use[::-1][k + 1] if k + 1 < len(use) else None
        noise = torch.randn(shape, generator=gen) if (sampler == "ddpm" and s_prev is not None) else None
        out = _Recorder.forward(_Silent(model), xs[k], model.seen[k][1])
        want = _independent_step(xs[k], out, shape[1], s_now, s_prev, ac, sampler, prediction, learn_sigma, clip, noise)
        got = xs[k + 1].double()
        if s_prev is None and clip:
            want = want.clamp(-1, 1)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=f"step t={s_now} -> {s_prev}")


class _Silent:
    """The recorder's parameters without the recording (to recompute a prediction)."""

    def __init__(self, m):
        self.a, self.b, self.learn_sigma, self.seen = m.a, m.b, m.learn_sigma, []


def test_respace_and_seeding():
    use, ac = S.respace(_schedule().alphas_cumprod, 50)
    assert use[0] == 0 and use[-1] == 999 and len(use) == 50 and np.all(np.diff(use) > 0)
    with pytest.raises(ValueError, match="steps"):
        S.respace(_schedule().alphas_cumprod, 0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_on_a_random_model(sampler):
    torch.manual_seed(0)
    m = M.build_model("unet-tiny", 1, 8, num_classes=10, learn_sigma=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # leave the zero init
    y = torch.arange(6) % 10
    kw = dict(sampler=sampler, steps=8, learn_sigma=True, y=y, guidance=2.0)
    a = S.sample(m, _schedule(), (6, 1, 8, 8), seed=5, **kw)
    b = S.sample(m, _schedule(), (6, 1, 8, 8), seed=5, **kw)
    c = S.sample(m, _schedule(), (6, 1, 8, 8), seed=6, **kw)
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert m.training  # mode restored
    raw = S.sample(m, _schedule(), (6, 1, 8, 8), sampler=sampler, steps=4, learn_sigma=True, clip=False)
    assert torch.isfinite(raw).all()


def test_save_grid(tmp_path):
    from PIL import Image

    x = torch.linspace(-1, 1, 10 * 8 * 8).view(10, 1, 8, 8)
    p = S.save_grid(x, tmp_path / "sub" / "g.png", nrow=5)
    im = Image.open(p)
    assert im.mode == "L" and im.size == (5 * (48 + 2) + 2, 2 * (48 + 2) + 2)
    rgb = S.to_uint8_grid(torch.zeros(4, 3, 16, 16))
    assert rgb.shape[-1] == 3 and rgb[2, 2, 0] == 128  # 0 -> mid-grey (127.5 rounded)
