"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant, in JAX.

The paper's autoencoder loss (appendix A) has an LPIPS term. LPIPS needs two pretrained weight
files that nothing here may download, so the user provides them:

  vgg: torchvision's ImageNet VGG16 (`vgg16-397923af.pth`, keys features.N.weight/bias), or any
       state dict with the same `features.N.*` / lpips' `net.sliceK.N.*` keys;
  lin: the lpips package's calibrated linear layers (`lpips/weights/v0.1/vgg.pth`, keys
       linK.model.1.weight), which the `lpips` wheel ships.

Both are read without torch (`transfusion_jax.weight_files`); .npz and .safetensors with the
same keys work too. `from_config` returns None, with a warning, when no files are configured:
the loss is then off. The computation follows the lpips package's `LPIPS(net="vgg")`: scale the
[-1,1] input, take VGG16's relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 activations, unit-
normalise each over channels, square the difference, weight channels by the linear layer,
average over space and sum over the five layers. The weights are frozen constants.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from transfusion_jax.models.autoencoder.weight_files import read_weights

# torchvision's VGG16 `features` indices: 13 convs, each followed by a ReLU, and 2x2 max pools.
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
POOL_INDICES = (4, 9, 16, 23)
TAP_AFTER = (3, 8, 15, 22, 29)  # relu1_2 ... relu5_3: lpips' five slices end here
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = np.asarray([-0.030, -0.088, -0.188], np.float32)  # lpips' ScalingLayer
SCALE = np.asarray([0.458, 0.448, 0.450], np.float32)


def _slice_key(index: int) -> str:
    """lpips' own name of features[index]: net.slice{k}.{index}."""
    bounds = (4, 9, 16, 23, 30)
    k = next(i for i, b in enumerate(bounds) if index < b) + 1
    return f"net.slice{k}.{index}"


def params_from_state_dicts(vgg: dict, lin: dict) -> dict:
    """numpy state dicts (torch layout) -> {"convs": [(w HWIO, b)] * 13, "lins": [w [C]] * 5}."""
    convs = []
    for index in CONV_INDICES:
        for prefix in (f"features.{index}", _slice_key(index)):
            if f"{prefix}.weight" in vgg:
                if f"{prefix}.bias" not in vgg:
                    raise ValueError(f"lpips vgg weights: {prefix}.weight without {prefix}.bias")
                w, b = vgg[f"{prefix}.weight"], vgg[f"{prefix}.bias"]
                convs.append((jnp.asarray(np.transpose(w, (2, 3, 1, 0)), jnp.float32),
                              jnp.asarray(b, jnp.float32)))
                break
        else:
            raise ValueError(f"lpips vgg weights: no features.{index}.weight (or "
                             f"{_slice_key(index)}.weight); expected a torchvision VGG16 state dict")
    lins = []
    for k, channels in enumerate(CHANNELS):
        name = f"lin{k}.model.1.weight"
        if name not in lin:
            raise ValueError(f"lpips lin weights: no {name}; expected the lpips package's "
                             "weights/v0.1/vgg.pth")
        w = np.asarray(lin[name], np.float32).reshape(-1)
        if w.shape != (channels,):
            raise ValueError(f"lpips lin weights: {name} has {w.size} values, expected {channels}")
        lins.append(jnp.asarray(w))
    return {"convs": convs, "lins": lins}


def load_params(vgg_path: str, lin_path: str) -> dict:
    return params_from_state_dicts(read_weights(vgg_path), read_weights(lin_path))


def from_config(loss_cfg) -> dict | None:
    """LPIPS params from loss.lpips_vgg / loss.lpips_lin, or None (loss off) with a warning."""
    vgg, lin = loss_cfg.get("lpips_vgg", ""), loss_cfg.get("lpips_lin", "")
    if not vgg or not lin:
        if loss_cfg.get("lpips", 0.0):
            warnings.warn("LPIPS perceptual loss is off: set loss.lpips_vgg (torchvision "
                          "vgg16-397923af.pth) and loss.lpips_lin (lpips' weights/v0.1/vgg.pth) "
                          "to turn it on; no weights are downloaded", stacklevel=2)
        return None
    return load_params(vgg, lin)


def _features(convs, x):
    """VGG16 features at the five taps; x [N,H,W,3] already scaled."""
    taps, h, conv_i = [], x, 0
    for index in range(30):
        if index in CONV_INDICES:
            w, b = convs[conv_i]
            conv_i += 1
            h = jax.lax.conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
        elif index - 1 in CONV_INDICES:
            h = jax.nn.relu(h)
        elif index in POOL_INDICES:
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        if index in TAP_AFTER:
            taps.append(h)
    return taps


def _unit(f):
    # lpips: f / (||f|| + 1e-10); the tiny term under the root keeps the gradient finite at 0.
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True) + 1e-20) + 1e-10)


def lpips(params: dict, x, y):
    """LPIPS distance per image [N] between x and y [N,H,W,3] in [-1,1] (float32)."""
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"lpips: got shapes {tuple(x.shape)} and {tuple(y.shape)}, expected two "
                         "equal [N, H, W, 3]")
    n = x.shape[0]
    both = (jnp.concatenate([x, y]).astype(jnp.float32) - SHIFT) / SCALE
    total = jnp.zeros((n,), jnp.float32)
    for f, w in zip(_features(params["convs"], both), params["lins"]):
        fx, fy = _unit(f[:n]), _unit(f[n:])
        total = total + jnp.mean(((fx - fy) ** 2) @ w, axis=(1, 2))
    return total
