"""The vocabulary: model.vocab_size real ids, the embedding and LM head padded to a multiple of
128, the padded columns out of the loss and of sampling; the Table 2 presets take the Llama 2
tokenizer (32000 pieces + PAD, BOI, EOI = 32003 ids)."""
import functools
import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import flax.linen as nn
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from transfusion_jax import objectives
from transfusion_jax.core.config import load_config
from transfusion_jax.data.tokenizer import Tokenizer
from transfusion_jax.inference.generation import TextSampling, sample_token
from transfusion_jax.models import Transfusion, example_inputs, patches_per_image
from transfusion_jax.models.transfusion import PADDED_LOGIT, VOCAB_MULTIPLE, padded_vocab_size
from rows import build_rows

TABLE2 = ("0.16b", "0.37b", "0.76b", "1.4b", "7b")


@pytest.mark.slow  # test-fast stays under 2 minutes
def test_padded_columns_are_out_of_the_loss_and_of_sampling():
    cfg = load_config("experiments/transfusion.py:tiny").model
    cfg.vocab_size = 500  # rows' random text ids are below 500
    assert padded_vocab_size(cfg) == 512
    p = patches_per_image(cfg)
    batch, _ = build_rows([[[6, "image", 5]], [[9]]], 48, 1, p)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    x = jax.random.normal(jax.random.key(0), (2, 1, cfg.latent_size, cfg.latent_size,
                                              cfg.latent_channels))
    t = jnp.full((2, 1), 100, jnp.int32)
    model = Transfusion(cfg)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch, x, t))
    assert shapes["params"]["embed"].shape == (512, cfg.dim)
    assert shapes["params"]["lm_head"]["kernel"].shape == (cfg.dim, 512)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.1, jnp.float32),
                          shapes)
    # Padded head columns far above the rest: unmasked, they would win every argmax.
    params["params"]["lm_head"]["kernel"] = params["params"]["lm_head"]["kernel"].at[:, 500:].set(5.0)

    targets, weights = batch["targets"], batch["text_weights"]

    @jax.jit
    def run(params):
        logits = model.apply(params, batch, x, t)["logits"]
        hidden = model.apply(params, batch, x, t, logits=False)["hidden"]
        lm_head = functools.partial(model.apply, params, method=Transfusion.logits_of)
        chunked = objectives.chunked_lm_loss_terms(hidden, lm_head, targets, weights, 7)
        loss = lambda p: objectives.lm_loss_terms(model.apply(p, batch, x, t)["logits"],
                                                  targets, weights)[0]
        grad = jax.grad(loss)(params)["params"]["lm_head"]["kernel"]
        return logits, chunked, grad

    logits, chunked, grad = run(params)
    assert logits.shape[-1] == 512 and np.all(np.asarray(logits[..., 500:]) == PADDED_LOGIT)
    want = objectives.lm_loss_terms(logits[..., :500], targets, weights)
    whole = objectives.lm_loss_terms(logits, targets, weights)
    for got in (whole, chunked):  # the whole and the chunked LM terms (model.logits_chunk)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        assert got[1] == want[1]
    assert not np.any(np.asarray(grad[:, 500:])) and np.any(np.asarray(grad[:, :500]))

    rows = logits.reshape(-1, 512)
    sample = jax.jit(sample_token, static_argnums=2)
    for sampling in (TextSampling(), TextSampling(temperature=1.0),
                     TextSampling(temperature=2.0, top_k=510), TextSampling(1.0, top_p=0.99)):
        for seed in range(3):
            ids = np.asarray(sample(jax.random.key(seed), rows, sampling))
            assert ids.max() < 500, sampling


def llama2_like_tokenizer() -> Tokenizer:
    """A sentencepiece model of the Llama 2 tokenizer's shape: 32000 pieces, unk=0, bos=1,
    eos=2, no pad, no BOI/EOI (a small trained model, padded with pieces)."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a red circle above a blue square"] * 20), model_writer=out,
        model_type="char", vocab_size=20, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(out.getvalue())
    while len(proto.pieces) < 32000:
        piece = proto.pieces.add()
        piece.piece, piece.score = f"\u2581w{len(proto.pieces)}", -100.0
    return Tokenizer(proto.SerializeToString())


def test_table2_presets_take_the_llama2_tokenizer():
    tok = llama2_like_tokenizer()
    assert (tok.num_pieces, tok.vocab_size) == (32000, 32003)
    assert (tok.pad_id, tok.boi_id, tok.eoi_id) == (32000, 32001, 32002)
    for size in TABLE2:
        model = load_config(f"experiments/transfusion.py:{size}").model
        # The trainer's check (trainers/transfusion.py): the tokenizer's ids fit the model.
        assert tok.vocab_size <= model.vocab_size, size
        padded = padded_vocab_size(model)
        assert padded % VOCAB_MULTIPLE == 0 and 0 <= padded - model.vocab_size < VOCAB_MULTIPLE
    model = load_config("experiments/transfusion.py:0.16b").model
    shapes = jax.eval_shape(Transfusion(model).init, jax.random.key(0),
                            *example_inputs(model, 8, 1))["params"]
    assert nn.unbox(shapes)["embed"].shape == (32128, 768)


@pytest.mark.parametrize("vocab,padded", [(512, 512), (32000, 32000), (32003, 32128), (1, 128)])
def test_padded_size(vocab, padded):
    assert padded_vocab_size(ml_collections.ConfigDict(dict(vocab_size=vocab))) == padded
