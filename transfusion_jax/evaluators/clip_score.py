"""CLIP score of images against their captions (paper section 4.1 reports it beside FID for
text-to-image; Hessel et al., 2021).

    clip_score = mean over pairs of 100 * max(cos(E_image, E_caption), 0)

the formula of torchmetrics' CLIPScore (100 * cosine, clipped at 0, averaged over the images;
Hessel et al. weigh by 2.5 instead of 100). torchmetrics' code clips the average rather than
each pair: the two agree whenever no cosine is negative, which is what a trained CLIP gives an
image and its caption. The cosines themselves (`ClipScorer.cosines`) are kept beside it.

The CLIP is open_clip's, in Flax (models/clip.py), ViT-B/32 by default ("ViT-B-32"; any name of
models.clip.ARCHS, e.g. "ViT-L-14"), with the weights of an open_clip checkpoint the user gives
(`weights`: open_clip_pytorch_model.bin or open_clip_model.safetensors) and CLIP's BPE file
(`vocab`: bpe_simple_vocab_16e6.txt.gz, from the open_clip package); nothing is downloaded.
Images are preprocessed as open_clip's eval transform does (shortest side to 224, bicubic;
center crop; OpenAI's mean and std), captions tokenized as open_clip's tokenizer does (77 ids).

The `fid` evaluator computes it on the images it generates (options clip_weights, clip_vocab,
clip_model, clip_normalize): the images are generated once for both numbers.

Random weights (`random_weights=True`, the fid evaluator's clip_random_weights): the architecture
with Flax's random initialisation (models.clip.random_variables(model, seed)) instead of a weight
file, reported as "clip_score_random_weights": a check that the pipeline runs (generation,
preprocessing, both towers, the score), not a CLIP score, as fid_random_weights is not FID.
Without `vocab` it tokenizes with models.clip.HashTokenizer (pieces hashed to ids between CLIP's
start and end tokens: with random weights the tokenizer's exactness means nothing); with `vocab`
it uses CLIP's own. Nothing is downloaded either way.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from transfusion_jax.models import clip as clip_net


def clip_score(cosines) -> float:
    """100 * max(cos, 0), averaged over the pairs."""
    cosines = np.asarray(cosines, np.float64)
    if cosines.size == 0:
        raise ValueError("clip_score: no image-caption pairs")
    return float(np.mean(100.0 * np.maximum(cosines, 0.0)))


def check_options(weights: str, vocab: str, model=clip_net.DEFAULT_ARCH,
                  normalize: str = "openai", option: str = "clip_",
                  random_weights: bool = False) -> None:
    """Both files exist (else a FileNotFoundError naming the option, the path and where to get
    the file), the architecture and the normalization are known; called before any work.
    random_weights: no weight file (one given is an error: which one is meant?), the vocabulary
    file optional (checked when given)."""
    if random_weights and weights:
        raise ValueError(f"{option}weights={weights!r} and {option}random_weights=True: give one "
                         "(a weight file for the CLIP score, or random weights for a pipeline "
                         "check)")
    files = (("weights", weights, "weight file", clip_net.WEIGHTS_HELP),
             ("vocab", vocab, "vocabulary file", clip_net.VOCAB_HELP))
    for name, path, what, help_ in files:
        if random_weights and (name == "weights" or not path):
            continue
        if not path:
            raise FileNotFoundError(f"{option}{name}: the CLIP score needs the path of "
                                    f"{help_}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{option}{name}={path!r}: the CLIP {what} does not exist; "
                                    f"expected {help_}")
    clip_net.arch(model)
    if normalize not in clip_net.NORMALIZATIONS:
        raise ValueError(f"{option}normalize={normalize!r}: expected one of "
                         f"{sorted(clip_net.NORMALIZATIONS)} (the mean and std the checkpoint "
                         "was trained with, as open_clip's pretrained table gives them)")


class ClipScorer:
    """CLIP with its weights and tokenizer: image and caption embeddings in fixed-size batches
    (`batch`; the last one padded), each tower jitted once. random_weights: no weight file, the
    random network of `seed`; without `vocab`, models.clip.HashTokenizer (module doc)."""

    def __init__(self, weights: str, vocab: str, model: str = clip_net.DEFAULT_ARCH,
                 batch: int = 32, normalize: str = "openai", random_weights: bool = False,
                 seed: int = 0):
        check_options(weights, vocab, model, normalize, option="", random_weights=random_weights)
        self.config, self.random = clip_net.arch(model), random_weights
        c = self.config
        self.tokenizer = (clip_net.Tokenizer(vocab, c.context_length) if vocab
                          else clip_net.HashTokenizer(c.context_length, c.vocab_size))
        self.variables = (clip_net.random_variables(c, seed) if random_weights
                          else clip_net.load_clip(weights, c))
        self.batch, self.size = batch, self.config.image_size
        mean, std = clip_net.NORMALIZATIONS[normalize]
        net = clip_net.CLIP(self.config)
        self._image = jax.jit(lambda v, x: net.apply(
            v, clip_net.normalize(x, mean, std), method=clip_net.CLIP.encode_image))
        self._text = jax.jit(lambda v, ids: net.apply(v, ids, method=clip_net.CLIP.encode_text))

    def _batched(self, fn, items, prepare) -> np.ndarray:
        out = []
        for i in range(0, len(items), self.batch):
            chunk = prepare(items[i:i + self.batch])
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, 0)])
            out.append(np.asarray(fn(self.variables, jnp.asarray(chunk)))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

    def preprocess(self, images) -> np.ndarray:
        """Images (uint8 [N, H, W, 3], PIL images or image files) -> uint8 [N, 224, 224, 3],
        resized and cropped as open_clip's preprocess (normalized inside the jitted tower)."""
        return np.stack([clip_net.resize_and_crop(Image.open(im) if isinstance(im, str) else im,
                                                  self.size) for im in images])

    def image_embeddings(self, images) -> np.ndarray:
        """Images (uint8 [N, H, W, 3], PIL images or image files, read a batch at a time) ->
        L2-normalized [N, embed_dim]."""
        return self._batched(self._image, images, self.preprocess)

    def text_embeddings(self, texts) -> np.ndarray:
        """Captions -> L2-normalized [N, embed_dim]."""
        return self._batched(self._text, list(texts), self.tokenizer)

    def cosines(self, images, texts) -> np.ndarray:
        """cos(E_image, E_caption) per pair [N]."""
        if len(images) != len(texts):
            raise ValueError(f"clip score: {len(images)} images, {len(texts)} captions")
        return (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1)

    def score(self, images, texts) -> float:
        return clip_score(self.cosines(images, texts))

