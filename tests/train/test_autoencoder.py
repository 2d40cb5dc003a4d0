"""speed_train.autoencoder: the KL autoencoder, the latent cache, `latents:PATH` and decoded scoring."""
import json

import numpy as np
import pytest
import torch

from speed_train import autoencoder as ae
from speed_train.data import load_dataset


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # one classifier cache for this session's autoencoder and regime tests (training it is most of their time)
    path = tmp_path_factory.getbasetemp() / "shared-classifier-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, cache):
    """A tiny encode of the embedded digits (8x8 -> 4x4x4): seconds on one thread."""
    out = tmp_path_factory.mktemp("latents") / "digits"
    mp = pytest.MonkeyPatch()
    mp.setenv("SPEED_KERNELS_CACHE", str(cache))
    try:
        info = ae.encode_dataset("digits", out, downsample=2, width=16, steps=300, batch_size=64, lr=1e-2,
                                 eval_samples=200, verbose=False)
    finally:
        mp.undo()
    return out, info


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(ae.kl_to_standard_normal(mean, logvar), ref, rtol=1e-5, atol=1e-5)


def test_shapes_and_bad_arguments():
    for f, hw in ((2, 16), (4, 8), (8, 4)):
        m = ae.KLAutoencoder(1, 4, f, width=16)
        mean, logvar = m.encode(torch.zeros(2, 1, 32, 32))
        assert mean.shape == logvar.shape == (2, 4, hw, hw)
        assert m.decode(mean).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="downsample"):
        ae.KLAutoencoder(1, 4, 3)
    with pytest.raises(ValueError, match="latent_channels"):
        ae.KLAutoencoder(1, 0, 4)
    with pytest.raises(ValueError, match="divisible"):
        ae.train_autoencoder(torch.zeros(4, 1, 6, 6), downsample=4, steps=1)
    with pytest.raises(ValueError, match="kl_weight"):
        ae.train_autoencoder(torch.zeros(4, 1, 8, 8), downsample=2, steps=1, kl_weight=-1)
    with pytest.raises(ValueError, match="zero spread"):
        ae.latent_scale(torch.ones(3, 4))
    with pytest.raises(FileNotFoundError, match="speed-kernels encode"):
        load_dataset("latents:/nonexistent/folder")


def test_encode_writes_scaled_latents_and_reports_reconstruction(encoded):
    out, info = encoded
    x, y, meta = ae.load_latents(out)
    digits = load_dataset("digits")
    assert x.shape == (1797, 4, 4, 4) and x.dtype == torch.float32
    assert torch.equal(y, digits.labels)
    assert abs(float(x.double().std()) - 1.0) < 1e-4  # LDM's scale factor makes unit std
    # the scale is 1/std of the posterior means of the saved encoder (recomputed independently)
    model, ck = ae.load_autoencoder(out)
    with torch.no_grad():
        mean = model.encode(digits.images)[0]
    assert meta["scale"] == pytest.approx(1.0 / float(mean.double().std()), rel=1e-5)
    torch.testing.assert_close(x, mean * meta["scale"], rtol=1e-4, atol=1e-5)
    # reconstruction quality: recomputed from the saved model on the held-out images it reports
    rec = info["recon_eval"]
    assert rec["n"] == 200 and set(info["real_vs_real"]) == {"mmd2", "swd", "fd"}
    assert json.loads((out / "info.json").read_text())["recon_eval"] == rec
    g = torch.Generator().manual_seed(0)  # the evaluator's split of the real pool (seed 0)
    perm = torch.randperm(digits.images.shape[0], generator=g)
    held = digits.images[perm[digits.images.shape[0] // 2:]][:200]
    with torch.no_grad():
        r = model.decode(model.encode(held)[0]).clamp(-1, 1)
    assert rec["mse"] == pytest.approx(float((r - held).pow(2).mean()), rel=1e-4)
    # it learned something: far better than predicting the mean image
    assert rec["mse"] < 0.35 * float((held - digits.images.mean(0)).pow(2).mean())


def test_latents_source_trains_and_the_evaluator_decodes(encoded, cache, monkeypatch, tmp_path):
    out, _ = encoded
    data = load_dataset(f"latents:{out}")
    assert data.images.shape == (1797, 4, 4, 4) and not data.pixel_space and not data.flip
    assert data.num_classes == 10 and data.name == "latents-digits"
    monkeypatch.setenv("SPEED_KERNELS_CACHE", str(cache))  # the classifier the fixture trained
    ev = ae.latent_evaluator(f"latents:{out}", n_samples=64)
    z = data.images[:64]
    scores = ev(z)
    model, _ = ae.load_autoencoder(out)
    with torch.no_grad():
        imgs = model.decode(z / ev.scale)
    direct = ev.pixel(imgs)
    for m in ev.metric_names:
        assert scores[m] == pytest.approx(direct[m], rel=1e-9)
    assert ev.floor == ev.pixel.floor and ev.describe()["decoded_by"] == str(out)
    assert ev.describe()["reconstruction"]["n"] == 200
    with pytest.raises(ValueError, match="latents"):
        ev.decode(torch.zeros(4, 4))
    # a DiT learns on the latents through the trainer
    from speed_train.trainer import TrainConfig, Trainer

    tr = Trainer(TrainConfig(data=f"latents:{out}", model="DiT-tiny", strategy="adaptive", learn_sigma=True, steps=3,
                             batch_size=16, device="cpu", out=str(tmp_path / "run"), sample_n=4, sample_steps=2,
                             progress=False, ckpt_every=0))
    try:
        s = tr.run()
    finally:
        tr.close()
    assert s["steps"] == 3 and np.isfinite(s["final_loss"])
    assert tr.model_args["in_channels"] == 4 and tr.model_args["image_size"] == 4


def test_latent_run_grids_show_decoded_images(encoded, tmp_path):
    """Sample grids of a latent run are the decoder's images (1 channel, 8x8 digits), not 4 latent channels."""
    from PIL import Image

    from speed_train.trainer import TrainConfig, Trainer

    out, _ = encoded
    tr = Trainer(TrainConfig(data=f"latents:{out}", model="DiT-tiny", strategy="uniform", steps=1, batch_size=8,
                             device="cpu", out=str(tmp_path / "run"), sample_n=4, sample_steps=2, progress=False,
                             ckpt_every=0, class_cond=False))
    try:
        tr.run()
    finally:
        tr.close()
    decode = ae.latent_decoder(f"latents:{out}")
    imgs = decode(torch.zeros(2, 4, 4, 4))
    assert imgs.shape == (2, 1, 8, 8)
    grid = np.asarray(Image.open(tmp_path / "run" / "samples.png"))
    assert grid.ndim == 2  # one grey channel: decoded digits (latents would show three of their 4 channels)
