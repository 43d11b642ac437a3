"""LPIPS in JAX against the `lpips` PyTorch package (test-only dependency, extras "parity").

The reference is lpips' own LPIPS(net="vgg") with its shipped, calibrated linear layers and a
randomly initialised VGG16 trunk (pnet_rand: nothing downloads). lpips builds the trunk with
torchvision.models.vgg16; where torchvision cannot be imported (PyPI's torchvision does not load
beside the CPU torch wheel used here), a stand-in with torchvision's VGG16 layer list is put in
its place for the duration of the test. Our side reads the weights from files with
`transfusion_jax.weight_files`, without torch.
"""
import importlib
import os
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from transfusion_jax.models.autoencoder import lpips as jlpips
from transfusion_jax.data.shapes.world import render_scene, sample_scene, scene_rng

torch = pytest.importorskip("torch")
pytest.importorskip("scipy")
if importlib.util.find_spec("lpips") is None:
    pytest.skip("lpips not installed (pip install -e '.[parity]')", allow_module_level=True)

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")  # torchvision's cfgs["D"]


def _vgg16_stand_in():
    nn = torch.nn

    def vgg16(pretrained=False, **_):
        assert not pretrained, "the test never asks for pretrained weights"
        layers, c = [], 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c = v
        return types.SimpleNamespace(features=nn.Sequential(*layers))

    module = types.ModuleType("torchvision")
    module.models = types.SimpleNamespace(vgg16=vgg16)
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(lpips.LPIPS module with random trunk, vgg weight file, lin weight file)."""
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    try:
        import torchvision.models  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: use the stand-in
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules["torchvision"] = _vgg16_stand_in()
    try:
        import lpips
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=True, verbose=False).eval()
    finally:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    # Random trunk with non-zero biases, saved as torchvision names (features.N.*) in the
    # legacy torch.save format torchvision's own vgg16 file uses.
    with torch.no_grad():
        for m in model.net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                m.bias.uniform_(-0.1, 0.1)
    vgg = {f"features.{k.split('.')[1]}.{k.split('.')[2]}": v  # slice1.0.weight -> features.0.weight
           for k, v in model.net.state_dict().items()}
    path = tmp_path_factory.mktemp("lpips") / "vgg16.pth"
    torch.save(vgg, path, _use_new_zipfile_serialization=False)
    lin = os.path.join(os.path.dirname(importlib.util.find_spec("lpips").origin),
                       "weights", "v0.1", "vgg.pth")
    return model, str(path), lin


def images(n, size, seed):
    """Shapes-world scenes and noisy copies: pairs at realistic LPIPS distances, in [-1,1]."""
    x = np.stack([render_scene(sample_scene(scene_rng(seed, "train", i)), size) for i in range(n)])
    x = x.astype(np.float32) / 127.5 - 1
    noise = np.random.default_rng(seed).normal(0, 0.2, x.shape).astype(np.float32)
    return x, np.clip(x + noise, -1, 1)


@pytest.mark.slow
def test_parity_with_lpips_package(reference):
    model, vgg_path, lin_path = reference
    params = jlpips.load_params(vgg_path, lin_path)
    x, y = images(3, 64, seed=0)
    x[2], y[2] = y[0], np.random.default_rng(1).uniform(-1, 1, y[0].shape)  # a far pair too
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2),
                    torch.from_numpy(y).permute(0, 3, 1, 2)).reshape(-1).numpy()
    ours = np.asarray(jlpips.lpips(params, jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    assert ref.min() > 1e-3, "pairs must be at a non-trivial distance for the test to mean much"


@pytest.mark.slow
def test_identical_images_and_gradient_finite(reference):
    _, vgg_path, lin_path = reference
    params = jlpips.load_params(vgg_path, lin_path)
    x, y = images(2, 32, seed=3)
    assert np.allclose(jlpips.lpips(params, jnp.asarray(x), jnp.asarray(x)), 0.0, atol=1e-7)
    grad = jax.grad(lambda a: jlpips.lpips(params, a, jnp.asarray(y)).sum())(jnp.asarray(x))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0


def test_off_without_weights_warns():
    cfg = ml_collections.ConfigDict(dict(lpips=1.0, lpips_vgg="", lpips_lin=""))
    with pytest.warns(UserWarning, match="LPIPS perceptual loss is off"):
        assert jlpips.from_config(cfg) is None


def test_wrong_file_names_the_key(tmp_path):
    np.savez(tmp_path / "v.npz", **{"features.0.weight": np.zeros((64, 3, 3, 3))})
    np.savez(tmp_path / "l.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="features.0.bias|features.2.weight"):
        jlpips.load_params(str(tmp_path / "v.npz"), str(tmp_path / "l.npz"))
