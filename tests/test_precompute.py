"""Precomputed latents (transfusion_jax.precompute, data.image_source "latents"): the CLI writes
what the frozen autoencoder gives for every image of the source, record by record; the pipeline
reading them gives the pixel pipeline's batches with `latents` in place of `images`; and the
trainer follows the same loss curve either way.

One tiny VAE (trained 2 steps) serves the whole file; the shapes source is cut to NUM_DOCS
records so that precomputing it takes a second."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from transfusion_jax.core import checkpoint
from transfusion_jax.models.autoencoder import loader
from transfusion_jax import precompute
from transfusion_jax.trainers import autoencoder as train_autoencoder
from transfusion_jax.trainers import transfusion as trainer
from transfusion_jax.core.config import load_config
from transfusion_jax.data import counters
from transfusion_jax.data.shapes import text as shapes_text
from transfusion_jax.data import latent_records
from transfusion_jax.data.config import get_data_config
from transfusion_jax.data.documents import DocumentBuilder, load_image
from transfusion_jax.data.pipeline import make_pipeline
from transfusion_jax.data.sources import build_image_source
from transfusion_jax.data.tokenizer import train_tokenizer
from transfusion_jax.models.autoencoder.model import Autoencoder

NUM_DOCS = 48
S, P = 16, 16  # tiny preset images; (16 / 2 / 2)^2 patches of 2x2 latents
LATENT = (8, 8, 8)
TINY = "experiments/transfusion.py:tiny"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vae"))
    config = load_config("experiments/autoencoder.py:tiny,kind=vae")
    config.total_steps = config.evals.heldout.every = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no LPIPS weights here: the loss says so
        train_autoencoder.train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def codec(vae_dir):
    return loader.load_codec(ml_collections.ConfigDict(dict(kind="vae", checkpoint=vae_dir,
                                                       downsample=2)))


@pytest.fixture(scope="module")
def latents_dir(vae_dir, tmp_path_factory):
    """The tiny preset's image source, precomputed by the CLI as a user runs it."""
    out = tmp_path_factory.mktemp("latents") / "out"
    run = subprocess.run(
        [sys.executable, "-m", "transfusion_jax.precompute", "--config", TINY,
         "--autoencoder", vae_dir, "--out", str(out), "--shards", "3", "--batch_size", "8",
         f"--config.data.shapes_num_documents={NUM_DOCS}"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{NUM_DOCS}/{NUM_DOCS} records (100.0%)" in run.stderr and "records/s" in run.stderr
    return str(out)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(shapes_text.text_corpus(0, "train", 1000), 512)


def tiny_data(**kw):
    """The tiny preset's data config (what latents_dir was computed from), as the tests read it."""
    data = load_config(TINY).data
    for key, value in {"shapes_num_documents": NUM_DOCS, "batch_size": 4, "read_threads": 1,
                       **kw}.items():
        data[key] = value
    return data


def strip_images(record):
    return latent_records.map_images(record, lambda value: None)


def source_images(record) -> list:
    found = []
    latent_records.map_images(record, lambda value: found.append(value))
    return found


# ---------------------------------------------------------------- precompute: what it writes

@pytest.mark.slow
def test_vae_round_trip(latents_dir, vae_dir, codec):
    manifest = latent_records.read_manifest(latents_dir)
    assert manifest["kind"] == "vae" and manifest["dtype"] == "float32"
    assert tuple(manifest["latent_shape"]) == LATENT
    assert manifest["num_records"] == NUM_DOCS and manifest["num_failed_images"] == 0
    assert [s["num_records"] for s in manifest["shards"]] == [16, 16, 16]
    with open(os.path.join(vae_dir, "latent_stats.json")) as f:
        assert manifest["autoencoder"]["latent_stats"] == json.load(f)
    assert manifest["autoencoder"]["workdir"] == os.path.abspath(vae_dir)
    assert manifest["data"]["image_source"] == "shapes" and manifest["data"]["image_size"] == S

    stored, pixels_source = latent_records.LatentsSource(latents_dir), build_image_source(tiny_data())
    assert len(stored) == len(pixels_source) == NUM_DOCS
    pixels, got = [], []
    for i in range(NUM_DOCS):
        original, record = pixels_source[i], stored[i]
        assert strip_images(record) == strip_images(original)  # captions, parts, order: as is
        pixels += [load_image(image, S) for image in source_images(original)]
        got += source_images(record)
    assert manifest["num_images"] == len(got) > NUM_DOCS  # interleaved documents have several
    assert all(z.dtype == np.float32 and z.shape == LATENT for z in got)
    expected = jax.jit(codec.encode_mean)(codec.variables, jnp.asarray(np.stack(pixels)))
    np.testing.assert_allclose(np.stack(got), expected, atol=1e-6, rtol=0)
    again = pickle.loads(pickle.dumps(stored))  # what Grain hands its worker processes
    np.testing.assert_array_equal(source_images(again[5])[0], source_images(stored[5])[0])


@pytest.fixture
def vq_dir(tmp_path, monkeypatch):
    """A tiny VQ-VAE workdir with random weights, which load_frozen returns as it would a
    trained one's: training one here (~20 s) would take a third of this file's time, and
    loading a trained VQ-VAE back is test_autoencoder_train's. (Random, not init: compiling
    the init alone takes 6 s.)"""
    config = load_config("experiments/autoencoder.py:tiny,kind=vq")
    model = Autoencoder(config.model)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, S, S, 3))))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: (rng.normal(0, 0.3, s.shape) if jnp.issubdtype(
        s.dtype, jnp.floating) else np.zeros(s.shape)).astype(s.dtype), shapes)
    workdir = str(tmp_path / "vq")
    os.makedirs(workdir)
    checkpoint.write_config(workdir, config)
    real = loader.load_frozen
    monkeypatch.setattr(loader, "load_frozen", lambda d, step=None: (
        (config, variables, None) if d == workdir else real(d, step)))
    return workdir


def test_vq_ids_round_trip_and_overwrite(vq_dir, tmp_path):
    config = ml_collections.ConfigDict({"data": tiny_data(shapes_num_documents=8)})
    out = str(tmp_path / "ids")
    manifest = precompute.precompute(config, out, autoencoder=vq_dir, batch_size=4)
    assert manifest["kind"] == "vq" and manifest["dtype"] == "int32"
    assert manifest["autoencoder"]["step"] is None  # no checkpoint: the fixture's weights
    assert tuple(manifest["latent_shape"]) == (8, 8) and manifest["autoencoder"]["latent_stats"] is None

    ae_config, variables, _ = loader.load_frozen(vq_dir)
    source, stored = build_image_source(config.data), latent_records.LatentsSource(out)
    pixels = np.stack([load_image(im, S) for i in range(8) for im in source_images(source[i])])
    ids = jax.jit(lambda v, x: Autoencoder(ae_config.model).apply(
        v, x, method=Autoencoder.encode).ids)(variables, pixels)
    got = np.stack([z for i in range(8) for z in source_images(stored[i])])
    assert got.dtype == np.int32 and got.shape == (len(pixels), 8, 8)
    np.testing.assert_array_equal(got, ids)
    assert len(np.unique(got)) > 1

    with pytest.raises(ValueError, match="--out = .*not empty"):
        precompute.precompute(config, out, autoencoder=vq_dir)
    manifest = precompute.precompute(config, out, autoencoder=vq_dir, shards=2, overwrite=True)
    assert sorted(os.listdir(out)) == [latent_records.shard_name(0, 2), latent_records.shard_name(1, 2), latent_records.MANIFEST]
    # The Transfusion pipeline reads VAE latents; VQ ids are the Chameleon baseline's.
    with pytest.raises(ValueError, match=r"data\.latents_dir = .*'vq' code ids"):
        make_pipeline(get_data_config(image_source="latents", latents_dir=out, image_size=S),
                      patches_per_image=P, tokenizer=None, shard_index=0, shard_count=1)


@pytest.mark.slow
def test_images_that_fail_to_load_are_skipped_for_the_same_reason(tmp_path, vae_dir, tok):
    Image.new("RGB", (20, 24), (200, 30, 30)).save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    lines = [{"image": "good.png", "caption": "a red square"},
             {"image": "corrupt.png", "caption": "a blue circle"},
             {"image": "missing.png", "caption": "a green triangle"},
             {"image": "corrupt.png", "caption": ""},  # the caption is checked first
             {"image": "good.png", "caption": "twice"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    data = get_data_config(image_source="image_files", image_files_path=str(tmp_path / "data.jsonl"),
                           image_size=S)
    out = str(tmp_path / "out")
    manifest = precompute.precompute(ml_collections.ConfigDict({"data": data}), out,
                                     autoencoder=vae_dir, batch_size=2)
    assert (manifest["num_images"], manifest["num_failed_images"]) == (2, 3)
    assert latent_records.LatentsSource(out)[1] == {"image": {"error": "corrupt_image"}, "caption": "a blue circle"}

    args = dict(patches_per_image=P, image_size=S, caption_first_prob=0.8, p_uncond=0.1,
                num_timesteps=1000)
    pixel_docs = DocumentBuilder(tok, **args)
    latent_docs = DocumentBuilder(tok, **args, latent_shape=LATENT)
    for i in range(len(lines)):
        a = pixel_docs(build_image_source(data)[i], np.random.default_rng(i))
        b = latent_docs(latent_records.LatentsSource(out)[i], np.random.default_rng(i))
        assert counters.as_dict(a["counts"]) == counters.as_dict(b["counts"]), i
        assert np.array_equal(a["tokens"], b["tokens"]) and b["images"].shape[1:] == LATENT
    reasons = [k for k, v in counters.as_dict(
        sum(latent_docs(latent_records.LatentsSource(out)[i], np.random.default_rng(i))["counts"]
            for i in range(len(lines)))).items() if k.startswith("skipped_") and v]
    assert reasons == ["skipped_corrupt_image", "skipped_missing_image", "skipped_empty_caption"]


@pytest.mark.slow
def test_precompute_errors_name_the_field(tmp_path, vae_dir):
    config = ml_collections.ConfigDict({"data": tiny_data()})
    with pytest.raises(ValueError, match="--autoencoder: none given"):
        precompute.precompute(config, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="--autoencoder = .*no config.json"):
        precompute.precompute(config, str(tmp_path / "a"), autoencoder=str(tmp_path))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # never deletes what it did not write
        with pytest.raises(ValueError, match="--out = .*full"):
            precompute.precompute(config, str(tmp_path / "full"), autoencoder=vae_dir,
                                  overwrite=overwrite)
    assert (tmp_path / "full" / "notes.txt").exists()
    config.data.image_source = "none"
    with pytest.raises(ValueError, match=r"data\.image_source = 'none'"):
        precompute.precompute(config, str(tmp_path / "a"), autoencoder=vae_dir)
    with pytest.raises(ValueError, match="--shards = 0"):
        precompute.precompute(ml_collections.ConfigDict({"data": tiny_data()}),
                              str(tmp_path / "a"), autoencoder=vae_dir, shards=0)


# ---------------------------------------------------------------- the pipeline reading them

@pytest.mark.slow
def test_pipeline_batches_equal_the_pixel_pipeline(latents_dir, codec, tok):
    def batches(**kw):
        p = make_pipeline(tiny_data(**kw), patches_per_image=P, tokenizer=tok, shard_index=0,
                          shard_count=1, **({"latent_shape": LATENT} if kw else {}))
        return [next(p) for _ in range(4)], p.metrics()

    pixels, pixel_metrics = batches()
    stored, stored_metrics = batches(image_source="latents", latents_dir=latents_dir)
    assert stored_metrics == pixel_metrics  # same documents, skips, splits, rows
    encode = jax.jit(codec.encode_mean)
    for a, b in zip(pixels, stored):
        assert set(b) == set(a) - {"images"} | {"latents"}
        for key in set(a) - {"images"}:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
        assert b["latents"].dtype == np.float32 and b["latents"].shape == (4, 4, *LATENT)
        used = a["image_mask"]
        assert used.any() and not used.all()
        # The same encoder on other batch sizes (precompute's batches, these rows' used slots):
        # float32 convolutions differ by ~2e-6 between batch shapes, nothing more.
        np.testing.assert_allclose(b["latents"][used], encode(codec.variables, a["images"][used]),
                                   atol=1e-5, rtol=0)
        assert not b["latents"][~used].any()  # empty slots: zeros, as empty pixel slots


@pytest.mark.slow
def test_latents_dir_errors_name_the_field(latents_dir, tmp_path, tok):
    def pipeline(latent_shape=None, patches=P, **kw):
        data = get_data_config(**{"image_source": "latents", "latents_dir": latents_dir,
                                  "image_size": S, "seq_len": 128, **kw})
        return make_pipeline(data, patches_per_image=patches, tokenizer=tok, shard_index=0,
                             shard_count=1, latent_shape=latent_shape)

    with pytest.raises(ValueError, match=r"data\.latents_dir = '': expected the --out folder"):
        get_data_config(image_source="latents")
    with pytest.raises(ValueError, match=r"data\.latents_dir = .*no such folder"):
        pipeline(latents_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"data\.latents_dir = .*no manifest\.json"):
        pipeline(latents_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data\.image_size = 32: .*encoded from 16x16"):
        pipeline(image_size=32)
    with pytest.raises(ValueError, match=r"data\.latents_dir = .*shape \(8, 8, 8\), but the "
                                         r"model expects \(8, 8, 4\)"):
        pipeline(latent_shape=(8, 8, 4))
    with pytest.raises(ValueError, match=r"data\.latents_dir = .*patches_per_image = 9"):
        pipeline(patches=9)
    torn = tmp_path / "torn"
    shutil.copytree(latents_dir, torn)
    os.remove(torn / latent_records.shard_name(1, 3))
    with pytest.raises(ValueError, match=r"data\.latents_dir = .*latents-00001-of-00003.* missing"):
        pipeline(latents_dir=str(torn))
    latent_records.check_autoencoder(latents_dir, latent_records.read_manifest(latents_dir)["autoencoder"]["workdir"])
    with pytest.raises(ValueError, match=r"autoencoder\.checkpoint = .*encoded by"):
        latent_records.check_autoencoder(latents_dir, str(tmp_path))


# ---------------------------------------------------------------- the trainer

@pytest.mark.slow
def test_precomputed_matches_on_the_fly(latents_dir, vae_dir, tmp_path):
    """Same seed, same batches: the loss of every step is the same whether the step encodes the
    pixels or normalises the precomputed means."""
    def run(name, **data):
        config = load_config(TINY)
        config.autoencoder.update(kind="vae", checkpoint=vae_dir, downsample=2)
        config.model.update(latent_size=8, latent_channels=8, patch_size=2)
        config.data.update(shapes_num_documents=NUM_DOCS, **data)
        config.update(total_steps=4, log_every=1)
        config.optimizer.warmup_steps = 2
        workdir = tmp_path / name
        if name != "pixels":  # the same tokenizer: only the images' path differs
            workdir.mkdir()
            shutil.copy(tmp_path / "pixels" / "tokenizer.model", workdir / "tokenizer.model")
        trainer.train(config, str(workdir))
        with open(workdir / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    on_the_fly = run("pixels")
    stored = run("latents", image_source="latents", latents_dir=latents_dir)
    assert [m["step"] for m in stored] == [m["step"] for m in on_the_fly] == [1, 2, 3, 4]
    for a, b in zip(on_the_fly, stored):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        for key in ("diffusion_loss", "lm_loss"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5)
