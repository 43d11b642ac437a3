"""The paper's theoretical training FLOPs, C = 6 N D (section 4.2, footnote 15).

    C = 6 * non_embedding_params(config.model) * trained_elements(config)

Footnote 15: Transfusion expresses an image in fewer sequence elements than Chameleon, which
shortens its documents and so the quadratic price of attention; "since this fact favors
Transfusion, we remove this confounder by using the theoretical FLOP calculation". So C counts
6 FLOPs per parameter per element (forward 2, backward 4) and nothing else: no attention
products (the L x L term that core/flops.py adds for MFU), no patch layers, no frozen
autoencoder. Both families are counted by the same rule.

N: the non-embedding parameters of the transformer trunk, every parameter of its blocks
(Q, K, V, O, the SwiGLU's three matrices, the two RMSNorm scales, Chameleon's QK-norm scales)
plus the final norm. Left out: the token embedding, the LM head, Transfusion's patch encoder /
decoder (linear or U-Net) and the frozen autoencoder. Why:
  - it is the same number for both families at a size (Table 2: "for both Transfusion and
    baselines"), up to Chameleon's QK-norm scales (2 x head_dim a layer: 0.002% at 0.16B). The
    parts left out are where the families differ, not what the comparison is about: Chameleon's
    16384 image ids widen its embedding and LM head (+25M parameters at 0.16B, +15%), the linear
    patch layers add under 0.5% to Transfusion. With them in N, Chameleon's points would move
    right by up to 15% at the small sizes and not at 7B: a bookkeeping shift of its slope, which
    would favour Transfusion, what footnote 15 sets out to avoid;
  - the embedding is a lookup, it does no matmul per element (Kaplan et al. 2020 count N
    without embeddings for the same reason, and find cleaner laws at small sizes, which matters
    for the micro study where the embedding is a large share);
  - the cost: our N is below the paper's size names (0.113B for "0.16B", 6.48B for "7B"), so
    our FLOPs axis sits a little left of Figure 5's at the small end. A parity ratio compares
    the two families at the same N, so it hardly moves.

D: the sequence elements the model is trained on, as the model sees them: text tokens plus an
image's elements (Transfusion: its patches, (latent / patch)^2, 256 at the paper's 2x2 on
32x32 latents; Chameleon: its VQ tokens, 1024). Theoretical again: steps x rows x row length
(total_steps * data.batch_size * data.seq_len), padding included, as the paper's "0.5T tokens"
is 250k steps x 2M-element batches. When both families train the same rows for the same steps
they have the same D and the same C (the paper's setting); an image in Chameleon's rows takes
4x (paper) or 16x (micro study) the elements, which is what D counts, never the images.
"""
from __future__ import annotations


def _get(cfg, key, default=None):
    try:
        return cfg[key]
    except (KeyError, AttributeError):
        return cfg.get(key, default) if hasattr(cfg, "get") else default


def block_params(model) -> int:
    """Parameters of one transformer block (models/transformer.py: Block)."""
    dim, heads, mlp = int(model["dim"]), int(model["heads"]), int(model["mlp_dim"])
    head_dim = dim // heads
    attention = 4 * dim * heads * head_dim  # query, key, value [dim, heads, head_dim]; out
    swiglu = 3 * dim * mlp  # gate, up [dim, mlp]; down [mlp, dim]
    norms = 2 * dim  # attn_norm, mlp_norm scales
    qk_norm = 2 * head_dim if _get(model, "qk_norm", False) else 0  # q_norm, k_norm scales
    return attention + swiglu + norms + qk_norm


def non_embedding_params(model) -> int:
    """N of 6ND: the transformer trunk (depth blocks and the final norm), no embedding, no LM
    head, no patch layers. `model` is config.model (a ConfigDict or a dict)."""
    return int(model["depth"]) * block_params(model) + int(model["dim"])


def embedding_params(model) -> int:
    """The token embedding and the LM head ([padded vocab, dim] each), for reference: what N
    leaves out besides the patch layers."""
    vocab = -(-int(model["vocab_size"]) // 128) * 128  # models/transfusion.py: padded_vocab_size
    return 2 * vocab * int(model["dim"])


def trained_elements(config) -> int:
    """D of 6ND: total_steps x data.batch_size rows x data.seq_len elements."""
    data = config["data"]
    return int(config["total_steps"]) * int(data["batch_size"]) * int(data["seq_len"])


def theoretical_flops(config) -> float:
    """C = 6 N D of a run's config (paper footnote 15)."""
    return 6.0 * non_embedding_params(config["model"]) * trained_elements(config)


def describe(config) -> dict:
    """{family, N, N_embedding, D, C} of a run's config."""
    model = config["model"]
    return {"family": str(_get(model, "family", "transfusion")),
            "N": non_embedding_params(model), "N_embedding": embedding_params(model),
            "D": trained_elements(config), "C": theoretical_flops(config)}
