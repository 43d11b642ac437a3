"""Stable Diffusion AutoencoderKL import against diffusers' PyTorch model on random weights
(test-only dependency, extras "parity"): the same posterior (mean, logvar) and decoder output."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfusion_jax.models.autoencoder.sd_import import load_sd_vae, params_from_diffusers
from transfusion_jax.models.autoencoder.model import Autoencoder
from transfusion_jax.models.autoencoder.weight_files import read_safetensors

torch = pytest.importorskip("torch")


def _import_diffusers():
    # diffusers imports torchvision when it is installed; PyPI's torchvision does not load beside
    # the CPU torch wheel used here, and the VAE does not need it: hide it during the import.
    saved = sys.modules.get("torchvision", "absent")
    if "torchvision" not in sys.modules:
        sys.modules["torchvision"] = None
    try:
        import diffusers
    except ImportError:
        pytest.skip("diffusers not installed (pip install -e '.[parity]')")
    finally:
        if saved == "absent":
            sys.modules.pop("torchvision", None)
    return diffusers


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers AutoencoderKL with random weights, the folder it was saved to)."""
    diffusers = _import_diffusers()
    torch.manual_seed(0)
    # Three levels, two ResBlocks per level, width changes on both paths: every mapping rule used.
    model = diffusers.AutoencoderKL(
        block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, latent_channels=4,
        norm_num_groups=32, sample_size=32).eval()
    with torch.no_grad():  # norms away from (1, 0) so that a swapped scale/bias would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    path = tmp_path_factory.mktemp("sdvae")
    model.save_pretrained(path)
    return model, str(path)


@pytest.mark.slow
def test_parity_with_diffusers(reference):
    torch_model, path = reference
    cfg, variables, scaling, shift = load_sd_vae(path)
    assert (scaling, shift) == (0.18215, 0.0)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        post = torch_model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        z = post.mean
        ref_x = torch_model.decode(z).sample.permute(0, 2, 3, 1).numpy()
        ref_mean, ref_logvar = (a.permute(0, 2, 3, 1).numpy() for a in (post.mean, post.logvar))
    model = Autoencoder(cfg)
    enc = model.apply(variables, jnp.asarray(x), method=Autoencoder.encode)
    np.testing.assert_allclose(enc.mean, ref_mean, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(enc.logvar, ref_logvar, atol=1e-4, rtol=1e-4)
    out = model.apply(variables, jnp.asarray(ref_mean), method=Autoencoder.decode)
    np.testing.assert_allclose(out, ref_x, atol=1e-4, rtol=1e-4)
    assert np.abs(ref_x).mean() > 0.05  # a decoder output that is not trivially zero


def test_legacy_attention_names(reference):
    _, path = reference
    cfg, variables, _, _ = load_sd_vae(path)
    state = read_safetensors(f"{path}/diffusion_pytorch_model.safetensors")
    renamed = {}
    for k, v in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        # LDM stored the projections as 1x1 convs.
        renamed[k] = v[:, :, None, None] if v.ndim == 2 and ".attentions." in k else v
    params = params_from_diffusers(renamed, cfg)
    jax.tree.map(np.testing.assert_array_equal, params, variables["params"])


def test_errors_name_the_tensor(reference):
    _, path = reference
    cfg, _, _, _ = load_sd_vae(path)
    state = read_safetensors(f"{path}/diffusion_pytorch_model.safetensors")
    missing = dict(state)
    del missing["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    with pytest.raises(ValueError, match=r"up_blocks\.0\.upsamplers\.0\.conv\.weight"):
        params_from_diffusers(missing, cfg)
    with pytest.raises(ValueError, match="extra.weight"):
        params_from_diffusers({**state, "extra.weight": np.zeros(3)}, cfg)
