"""train_autoencoder end to end on the tiny preset: two VQ steps with the discriminator on (its
delayed start is tested in test_autoencoder_losses; one compiled step keeps this test short),
the files a run leaves (metrics, reconstruction grid, checkpoint), and the evaluation's figures."""
import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from transfusion_jax.models.autoencoder import codec as codec_lib, loader
from transfusion_jax.trainers import autoencoder as train_autoencoder
from transfusion_jax.core.config import load_config
from transfusion_jax.data.shapes import world
from transfusion_jax.evaluate import evaluate
from transfusion_jax.evaluators import common as evaluators, reconstruction
from transfusion_jax.models.autoencoder.model import Autoencoder


@pytest.mark.slow
def test_tiny_vq_run(tmp_path):
    config = load_config("experiments/autoencoder.py:tiny,kind=vq")
    config.total_steps, config.evals.heldout.every, config.loss.gan_start_step = 2, 2, 0
    with pytest.warns(UserWarning, match="LPIPS perceptual loss is off"):
        results = train_autoencoder.train(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]  # one line per step; evaluations in evals/
    assert all(np.isfinite(r["loss"]) and r["codebook"] > 0 and "gan_d" in r for r in records)
    assert sorted(os.listdir(tmp_path / "evals")) == ["2", "2.json", "report.md"]
    saved = json.loads((tmp_path / "evals" / "2.json").read_text())
    assert results == {**saved, "step": 2}
    assert 0 < results["heldout/codes_used"] <= 1 and results["heldout/codes_seen"] == 8 * 8 * 8
    grid = np.asarray(Image.open(tmp_path / "evals" / "2" / "heldout" / "recon.png"))
    assert grid.shape == (2 * 16, 8 * 16, 3)
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
    assert not os.path.exists(tmp_path / "latent_stats.json")  # the VAE's only
    # The checkpoint loads back frozen and reconstructs the held-out images as in training, and
    # the evaluate entry point gives training's numbers.
    loaded_config, variables, stats = loader.load_frozen(str(tmp_path))
    assert stats is None and loaded_config.model.kind == "vq"
    context = evaluators.Context(loaded_config, None, None, str(tmp_path))
    again = reconstruction.Evaluator(context).run(variables, str(tmp_path))
    assert again["psnr"] == pytest.approx(results["heldout/psnr"], abs=1e-4)
    (tmp_path / "evals" / "2.json").unlink()
    assert evaluate(str(tmp_path)) == saved


def test_identity_has_nothing_to_train(tmp_path):
    config = load_config("experiments/autoencoder.py:tiny,kind=identity")
    with pytest.raises(ValueError, match="model.kind: got 'identity'"):
        train_autoencoder.train(config, str(tmp_path))


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory):
    """The tiny VAE trained 4 steps. (Its exact resume, after kill -9 and a damaged checkpoint:
    tests/test_fault_injection.py; a resume with another config is refused by the check both
    trainers share: tests/test_faults.py.)"""
    config = load_config("experiments/autoencoder.py:tiny,kind=vae")
    config.total_steps, config.checkpoint_every = 4, 100
    workdir = str(tmp_path_factory.mktemp("straight"))
    with pytest.warns(UserWarning, match="LPIPS"):
        train_autoencoder.train(config, workdir)
    return (workdir,)


@pytest.mark.slow
def test_codec_normalises_and_inverts(vae_runs):
    """loader.load_codec: (mean - shift) * scale has zero mean and unit std on the held-out images
    the statistics were measured on; decode undoes the normalisation."""
    workdir = vae_runs[0]
    ae = ml_collections.ConfigDict(dict(kind="vae", checkpoint=workdir, downsample=2))
    codec = loader.load_codec(ae)
    config, variables, _ = loader.load_frozen(workdir)
    x, _ = world.scene_batch(config.seed, "heldout", 0, config.data.heldout_images, 16)
    z = np.asarray(codec.encode(codec.variables, jnp.asarray(x)))
    assert z.shape == (8, 8, 8, 8)
    assert abs(z.mean()) < 1e-5 and z.std() == pytest.approx(1.0, rel=1e-4)
    model = Autoencoder(config.model)
    mean = model.apply(variables, jnp.asarray(x), method=Autoencoder.encode).latents
    expected = model.apply(variables, mean, method=Autoencoder.decode)
    np.testing.assert_allclose(codec.decode(codec.variables, z), expected, atol=1e-5)
    codec_lib.check(codec, ml_collections.ConfigDict(dict(latent_channels=8)))
    with pytest.raises(ValueError, match="model.latent_channels=3"):
        codec_lib.check(codec, ml_collections.ConfigDict(dict(latent_channels=3)))
    with pytest.raises(ValueError, match="autoencoder.downsample=8"):
        loader.load_codec(ml_collections.ConfigDict(dict(kind="vae", checkpoint=workdir, downsample=8)))
    with pytest.raises(ValueError, match="autoencoder.kind='vq'.*Chameleon"):
        loader.load_codec(ml_collections.ConfigDict(dict(kind="vq", checkpoint=workdir, downsample=2)))
    with pytest.raises(ValueError, match="autoencoder.checkpoint is empty"):
        loader.load_codec(ml_collections.ConfigDict(dict(kind="vae", checkpoint="", downsample=2)))
