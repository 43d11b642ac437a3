"""train_autoencoder end to end on the tiny preset: two VQ steps with the discriminator on (its
delayed start is tested in test_autoencoder_losses; one compiled step keeps this test short),
the files a run leaves (metrics, reconstruction grid, checkpoint), and the evaluation's figures."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from transfusion_jax import latents, train_autoencoder
from transfusion_jax.config import load_config
from transfusion_jax.model.autoencoder import Autoencoder


def test_tiny_vq_run(tmp_path):
    config = load_config("experiments/autoencoder.py:tiny,kind=vq")
    config.total_steps, config.eval_every, config.loss.gan_start_step = 2, 2, 0
    with pytest.warns(UserWarning, match="LPIPS perceptual loss is off"):
        results = train_autoencoder.train(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["codebook"] > 0 and "gan_d" in r for r in steps)
    evals = [r for r in records if "heldout_psnr" in r]
    assert len(evals) == 1 and evals[0] == {**results, "step": 2}
    assert 0 < results["codes_used"] <= 1 and results["codes_seen"] == 8 * 8 * 8
    grid = np.asarray(Image.open(tmp_path / "recon_2.png"))
    assert grid.shape == (2 * 16, 8 * 16, 3)
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
    assert not os.path.exists(tmp_path / "latent_stats.json")  # the VAE's only
    # The checkpoint loads back frozen and reconstructs the held-out images as in training.
    loaded_config, variables, stats = train_autoencoder.load_frozen(str(tmp_path))
    assert stats is None and loaded_config.model.kind == "vq"
    evaluate = train_autoencoder.make_eval(Autoencoder(loaded_config.model))
    heldout = train_autoencoder.scene_batch(config.seed, "heldout", 0, 8, 16)
    again, _ = train_autoencoder.evaluate_heldout(loaded_config, evaluate, variables, heldout)
    assert again["heldout_psnr"] == pytest.approx(results["heldout_psnr"], abs=1e-4)


def test_identity_has_nothing_to_train(tmp_path):
    config = load_config("experiments/autoencoder.py:tiny,kind=identity")
    with pytest.raises(ValueError, match="model.kind: got 'identity'"):
        train_autoencoder.train(config, str(tmp_path))


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory):
    """The tiny VAE trained 4 steps straight, and 2 steps + a resumed run to 4."""
    def run(name, total_steps):
        config = load_config("experiments/autoencoder.py:tiny,kind=vae")
        config.total_steps, config.checkpoint_every = total_steps, 100
        workdir = str(tmp_path_factory.mktemp(name))
        with pytest.warns(UserWarning, match="LPIPS"):
            train_autoencoder.train(config, workdir)
        return workdir

    straight = run("straight", 4)
    resumed = run("resumed", 2)
    config = load_config("experiments/autoencoder.py:tiny,kind=vae")
    config.total_steps, config.checkpoint_every = 4, 100
    with pytest.warns(UserWarning, match="LPIPS"):
        train_autoencoder.train(config, resumed)
    return straight, resumed


def test_vae_resume_is_bit_exact(vae_runs):
    straight, resumed = vae_runs
    _, a, stats_a = train_autoencoder.load_frozen(straight)
    _, b, stats_b = train_autoencoder.load_frozen(resumed)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert stats_a == stats_b and stats_a["step"] == 4
    lines = lambda d: [{k: v for k, v in json.loads(s).items() if k != "wall_s"}  # noqa: E731
                       for s in open(os.path.join(d, "metrics.jsonl"))]
    # The resumed run's file: the first run's steps 1-2 (and its step-2 evaluation), then 3-4.
    assert [r for r in lines(resumed) if "loss" in r] == [r for r in lines(straight) if "loss" in r]


def test_codec_normalises_and_inverts(vae_runs):
    """latents.load: (mean - shift) * scale has zero mean and unit std on the held-out images
    the statistics were measured on; decode undoes the normalisation."""
    workdir = vae_runs[0]
    ae = ml_collections.ConfigDict(dict(kind="vae", checkpoint=workdir, downsample=2))
    codec = latents.load(ae)
    config, variables, _ = train_autoencoder.load_frozen(workdir)
    x, _ = train_autoencoder.scene_batch(config.seed, "heldout", 0, config.data.heldout_images, 16)
    z = np.asarray(codec.encode(codec.variables, jnp.asarray(x)))
    assert z.shape == (8, 8, 8, 8)
    assert abs(z.mean()) < 1e-5 and z.std() == pytest.approx(1.0, rel=1e-4)
    model = Autoencoder(config.model)
    mean = model.apply(variables, jnp.asarray(x), method=Autoencoder.encode).latents
    expected = model.apply(variables, mean, method=Autoencoder.decode)
    np.testing.assert_allclose(codec.decode(codec.variables, z), expected, atol=1e-5)
    latents.check(codec, ml_collections.ConfigDict(dict(latent_channels=8)))
    with pytest.raises(ValueError, match="model.latent_channels=3"):
        latents.check(codec, ml_collections.ConfigDict(dict(latent_channels=3)))
    with pytest.raises(ValueError, match="autoencoder.downsample=8"):
        latents.load(ml_collections.ConfigDict(dict(kind="vae", checkpoint=workdir, downsample=8)))
    with pytest.raises(ValueError, match="autoencoder.kind='vq'.*Chameleon"):
        latents.load(ml_collections.ConfigDict(dict(kind="vq", checkpoint=workdir, downsample=2)))
    with pytest.raises(ValueError, match="autoencoder.checkpoint is empty"):
        latents.load(ml_collections.ConfigDict(dict(kind="vae", checkpoint="", downsample=2)))
