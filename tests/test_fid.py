"""FID (evaluators/fid.py, models/inception.py) against `pytorch-fid` (test-only dependency,
extras "parity"): the same network on the same random weights, the same Fréchet distance.

pytorch-fid's InceptionV3([0, 3], resize_input=True, normalize_input=True,
use_fid_inception=True) is built without its download (the weight loading is patched out), its
BatchNorm layers are given random scales and shifts and the statistics of random images, and
the Inception3 state dict (the layout of pt_inception-2015-12-05-6726825d.pth) is torch.save'd
for our loader, which reads it without torch. pytorch-fid imports torchvision; where the
torchvision package cannot be imported (PyPI's torchvision does not load beside the CPU torch
wheel used here: its C ops), torchvision's own models/inception.py and transforms are imported
without the package's __init__ for the duration of the import.
"""
import importlib
import importlib.metadata
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from transfusion_jax.core.config import load_config
from transfusion_jax.evaluators import common, fid
from transfusion_jax.models import inception as jinception
from test_generate import random_params
from test_inference_tasks import FakeTokenizer


def _torchvision_without_ops():
    """sys.modules["torchvision"] as a bare package (no __init__: no C ops), with the real
    torchvision.models.inception and torchvision.transforms under it."""
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]
    root = os.path.dirname(importlib.util.find_spec("torchvision").origin)
    for name, path in (("torchvision", root), ("torchvision.models", os.path.join(root, "models"))):
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module
    tv, models = sys.modules["torchvision"], sys.modules["torchvision.models"]
    tv.__version__ = importlib.metadata.version("torchvision")
    tv.models = models
    models.inception = importlib.import_module("torchvision.models.inception")
    models.inception_v3 = models.inception.inception_v3


@pytest.fixture(scope="module")
def pfid():
    """pytorch_fid's (inception, fid_score) modules (the test extra installs pytorch-fid)."""
    saved = {k: v for k, v in sys.modules.items()
             if k == "torchvision" or k.startswith("torchvision.")}
    try:
        try:
            importlib.import_module("torchvision.models.inception")
        except Exception:  # noqa: BLE001 - any import failure: the package without its C ops
            _torchvision_without_ops()
        from pytorch_fid import fid_score, inception
    finally:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return inception, fid_score


@pytest.fixture(scope="module")
def reference(pfid, tmp_path_factory):
    """(pytorch-fid's InceptionV3 with random weights, those weights as a .pth file)."""
    import torch
    inception, _ = pfid
    built = []
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception, "load_state_dict_from_url", lambda url, **_: {"url": url})
        mp.setattr(inception.torchvision.models.inception.Inception3, "load_state_dict",
                   lambda self, state, *a, **k: built.append((self, state["url"])))
        model = inception.InceptionV3([0, 3], resize_input=True, normalize_input=True,
                                      use_fid_inception=True)
    (inception3, url), = built
    assert url == inception.FID_WEIGHTS_URL == jinception.FID_WEIGHTS_URL
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.reset_running_stats()
                m.momentum = None  # running stats := the average over the batches below
        model.train()
        for size in (64, 340):  # both kinds of test input, so activations stay about 1
            model(torch.rand(2, 3, size, size))
    model.eval()
    path = tmp_path_factory.mktemp("inception") / jinception.FID_WEIGHTS_FILE
    torch.save(inception3.state_dict(), path)
    return model, str(path)


def _torch_features(model, images):
    import torch
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    x = x.float() / 255 if images.dtype == np.uint8 else x
    with torch.no_grad():
        block0, pool3 = model(x)
        block0 = torch.nn.functional.adaptive_avg_pool2d(block0, (1, 1))  # as fid_score.py does
    return block0[:, :, 0, 0].numpy(), pool3[:, :, 0, 0].numpy()


@pytest.mark.slow
def test_network_parity_with_pytorch_fid(reference, tmp_path):
    """Upsampled uint8 images and downsampled float ones; pool3 (2048) and block 0 (64)."""
    model, path = reference
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    large = rng.uniform(0, 1, (2, 340, 340, 3)).astype(np.float32)
    ours = fid.Inception(path, dims=2048, batch=2)
    ours64 = fid.Inception(path, dims=64, batch=2)
    for images in (small, large):
        ref64, ref = _torch_features(model, images)
        for got, want in ((ours.activations(images), ref), (ours64.activations(images), ref64)):
            err, scale = np.abs(got - want).max(), np.abs(want).max()
            print(f"parity {images.shape} {images.dtype} dims {want.shape[1]}: max abs diff "
                  f"{err:.3g}, max |activation| {scale:.3g}, mean {np.abs(want).mean():.3g}")
            assert err <= 1e-4 * scale and scale > 0.1
    files = []
    for i, im in enumerate(small):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im).save(files[-1])
    np.testing.assert_allclose(ours.activations_of_files(files), ours.activations(small),
                               atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_network_equal_in_float64(reference):
    """The float32 differences above are rounding, amplified by the random network (a 1e-7
    change of its input moves pytorch-fid's own pool3 by ~1e-4): in float64, on the same
    input (160x160: the blocks take any size from 75 up), the two agree to ~1e-12."""
    import torch
    model, path = reference
    x = np.random.default_rng(1).uniform(-1, 1, (1, 160, 160, 3))
    with torch.no_grad():
        blocks = [b.double() for b in model.blocks]
        want = torch.from_numpy(x.transpose(0, 3, 1, 2))
        for block in blocks:
            want = block(want)
        want = want[:, :, 0, 0].numpy()
        for block in blocks:
            block.float()
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                 jinception.load_inception(path))
        got = np.asarray(jinception.InceptionV3().apply(variables, jnp.asarray(x)))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())


def test_frechet_distance_matches_pytorch_fid(pfid):
    _, fid_score = pfid
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, 64)) / 8
    for n1, n2 in ((400, 300), (50, 40)):  # full-rank covariances; rank-deficient ones
        a = fid.statistics(rng.normal(size=(n1, 64)) @ mix)
        b = fid.statistics(rng.normal(0.1, 1.2, size=(n2, 64)) @ mix)
        want = fid_score.calculate_frechet_distance(*a, *b)
        assert fid.frechet_distance(*a, *b) == pytest.approx(want, rel=1e-6)
        assert fid.frechet_distance(*a, *a) == pytest.approx(0.0, abs=1e-6 * want)


def test_missing_weight_file_is_named(tmp_path):
    path = str(tmp_path / jinception.FID_WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match=f"{jinception.FID_WEIGHTS_FILE}.*not found.*"
                       "releases/download/fid_weights"):
        jinception.load_inception(path)
    context = common.Context(load_config("experiments/transfusion.py:tiny"), FakeTokenizer(),
                             None, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=jinception.FID_WEIGHTS_FILE):
        fid.Evaluator(context, num=4, inception=path)
    with pytest.raises(ValueError, match="random_weights=True"):
        fid.Evaluator(context, num=4)


class CountingInception:
    """Stands in for fid.Inception: features = the first pixels; counts its calls."""
    identity, calls = "stub", 0

    def activations(self, images):
        self.calls += 1
        return np.asarray(images, np.float64).reshape(len(images), -1)[:, :6]

    def activations_of_files(self, paths):
        return self.activations(np.stack([np.asarray(Image.open(p)) for p in paths]))


def test_reference_stats_are_computed_once(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    net, cache = CountingInception(), str(tmp_path / "cache")
    first = fid.reference_stats(net, images, cache)
    again = fid.reference_stats(net, images, cache)
    assert net.calls == 1 and all(np.array_equal(x, y) for x, y in zip(first, again))
    np.testing.assert_allclose(first[0], images.reshape(12, -1)[:, :6].mean(0))
    fid.reference_stats(net, images[:6], cache)  # another reference set
    net.identity = "other weights"
    fid.reference_stats(net, images, cache)
    assert net.calls == 3
    folder = tmp_path / "reference"
    folder.mkdir()
    for i, im in enumerate(images[:4]):
        Image.fromarray(im).save(folder / f"{i}.png")
    for _ in range(2):
        fid.reference_stats(net, str(folder), cache)
    assert net.calls == 4 and len(os.listdir(cache)) == 4


class WordTokenizer(FakeTokenizer):
    """Words as ids 10.. (shapes captions fit the tiny preset's 128 positions)."""

    def encode(self, text):
        return [10 + sum(map(ord, w)) % 400 for w in text.split()]


@pytest.mark.slow
def test_evaluator_on_tiny_preset(tmp_path):
    config = load_config("experiments/transfusion.py:tiny")
    context = common.Context(config, WordTokenizer(), None, str(tmp_path))
    evaluator = fid.Evaluator(context, num=6, batch=4, random_weights=True, dims=64,
                              sampler="ddim", steps=2, guidance=3.0)
    out = tmp_path / "out"
    out.mkdir()
    variables = jax.jit(lambda: random_params(config.model))()  # one compile: faster than eager
    scores = evaluator.run(variables, str(out))
    assert list(scores) == ["fid64_random_weights"] and np.isfinite(scores["fid64_random_weights"])
    assert scores["fid64_random_weights"] > 0
    with np.load(out / "generated_stats.npz") as f:
        assert f["mu"].shape == (64,) and f["sigma"].shape == (64, 64) and f["num"] == 6
    assert (out / "samples.png").exists() and len(os.listdir(tmp_path / "fid_cache")) == 1
    assert evaluator.run(variables, str(out)) == scores  # same seed, cached reference
