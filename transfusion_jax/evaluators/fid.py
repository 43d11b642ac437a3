"""FID of images generated from captions (type "fid"; paper section 4.1: MS-COCO, 30k images,
5k for ablations; DDPM-250 with CFG 5 in the scaling study, 3 in ablations).

As pytorch-fid computes it: pool3 activations of its InceptionV3 (models/inception.py, weights
from pytorch-fid's file, read without torch), their mean and covariance per image set, and the
Fréchet distance between the two Gaussians (`frechet_distance`, = calculate_frechet_distance).
The reference statistics are computed once per (reference set, weights, dims) and cached in an
.npz (`reference_stats`); the run's images are generated, decoded and measured batch by batch,
batch j's noise from fold_in(seed key, its first caption's index). With several processes each
computes its batches (of the reference too) and the activations are gathered in batch order
(evaluators/common.py).

Options: inception (the weight file; or random_weights=True: a random network, reported as
"fid_random_weights", which is not FID), num, batch, sampler / steps / guidance / seed, dims
(pytorch-fid's --dims: 2048, or 64/192/768, reported as "fid<dims>"), captions (a text file, one
caption a line) and reference (a folder of images, or an .npz with mu and sigma), which default
to the held-out scenes of the shapes world; cache_dir (default workdir/fid_cache), log_every.
Writes generated_stats.npz (mu, sigma, num) and samples.png into evals/<step>/<name>/.

CLIP score of the same images against their captions (evaluators/clip_score.py), reported as
"clip_score" beside the FID when clip_weights (an open_clip checkpoint: open_clip_pytorch_model.bin
or open_clip_model.safetensors) and clip_vocab (CLIP's bpe_simple_vocab_16e6.txt.gz) are given;
clip_model names the architecture (default "ViT-B-32"; models/clip.py:ARCHS), clip_normalize the
mean and std ("openai", or "inception" for the checkpoints trained with 0.5). The per-caption
cosines go to clip_cosines.npy. A missing file stops the evaluator before any work, naming it.
Or clip_random_weights=True: the clip_model architecture with random weights (seed `seed`; no
file), reported as "clip_score_random_weights", a pipeline check, not CLIP score; without
clip_vocab its captions are tokenized by models.clip.HashTokenizer (evaluators/clip_score.py).

Either model family (config.model.family): a Chameleon run samples its images as VQ-VAE tokens
(generation.Generator; `guidance` on their logits, the paper's 5; sampler and steps not used)
and decodes the code ids with its VQ-VAE.
"""
import glob
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import linalg

from transfusion_jax.core import distributed
from transfusion_jax.data.shapes.heldout import heldout_scenes
from transfusion_jax.evaluators import clip_score
from transfusion_jax.inference import generation
from transfusion_jax.inference.tasks import Sampling, make_generator, save_grid, to_uint8
from transfusion_jax.models import clip as clip_net
from transfusion_jax.models import family
from transfusion_jax.models import inception as inception_net
from transfusion_jax.models.autoencoder import loader

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)): pytorch-fid's calculate_frechet_distance,
    with its fallback (eps on the diagonals) when the product's square root is not finite."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        distributed.log(f"fid: singular product; adding {eps} to the covariances' diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"fid: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def statistics(acts) -> tuple[np.ndarray, np.ndarray]:
    """Activations [N, D] -> (mean [D], covariance [D, D]) in float64, as pytorch-fid."""
    acts = np.asarray(acts, np.float64)
    if acts.shape[0] < 2:
        raise ValueError(f"fid: {acts.shape[0]} image(s); a covariance needs at least 2")
    return acts.mean(0), np.cov(acts, rowvar=False)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class Inception:
    """The FID network with its weights (`weights`: pytorch-fid's file; None: random) ->
    `activations(images)`: jitted once for [batch, 299, 299, 3]; the last batch is padded."""

    def __init__(self, weights: str | None, dims: int = 2048, batch: int = 50, seed: int = 0,
                 log_every: int = 0):
        if dims not in inception_net.DIMS:
            raise ValueError(f"dims={dims}: expected one of {sorted(inception_net.DIMS)}")
        self.random = not weights
        self.variables = (inception_net.random_variables(seed) if self.random
                          else inception_net.load_inception(weights))
        self.identity = (f"random:{seed}" if self.random else _file_digest(weights)) + f":{dims}"
        self.dims, self.batch, self.log_every = dims, batch, log_every
        net = inception_net.InceptionV3(dims)
        self._net = jax.jit(lambda v, x: net.apply(v, x))
        self._prep = jax.jit(inception_net.preprocess)  # per input shape: small

    def features(self, images) -> np.ndarray:
        """One batch (at most `batch` images, uint8 or float in [0, 1]) -> [n, dims] float32."""
        n = len(images)
        if not 0 < n <= self.batch:
            raise ValueError(f"features: {n} images; expected 1..{self.batch}")
        x = np.asarray(images)
        x = np.concatenate([x, np.repeat(x[-1:], self.batch - n, 0)]) if n < self.batch else x
        return np.asarray(self._net(self.variables, self._prep(jnp.asarray(x))))[:n]

    def activations(self, images) -> np.ndarray:
        """Images [N, H, W, 3] (uint8, or float in [0, 1]) -> pool3 activations [N, dims]."""
        return self._run(len(images), lambda i: images[i:i + self.batch])

    def activations_of_files(self, paths) -> np.ndarray:
        """Image files (any sizes; RGB as pytorch-fid reads them) -> activations [N, dims]."""
        def load(path):
            x = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
            h, w = (inception_net.bilinear_matrix(n, inception_net.SIZE) for n in x.shape[:2])
            return np.einsum("oh,pw,hwc->opc", h, w, x)  # at 299x299 already, one jit for all

        return self._run(len(paths), lambda i: np.stack([load(p) for p in paths[i:i + self.batch]]))

    def _run(self, n: int, batch_from) -> np.ndarray:
        """Activations of n images in batches (`batch_from(i)`: the images from i on); with
        several processes each computes its batches (evaluators/common.py), gathered in order."""
        out, t0 = {}, time.perf_counter()
        for b, start in enumerate(range(0, n, self.batch)):
            if distributed.mine(b):
                out[b] = self.features(batch_from(start))
            if self.log_every and (b + 1) % self.log_every == 0:
                distributed.log(f"fid: inception, {min(n, (b + 1) * self.batch)} images "
                                f"({sum(map(len, out.values()))} here) in "
                                f"{time.perf_counter() - t0:.0f}s")
        acts = distributed.gather_batches(out)
        return np.concatenate(acts) if acts else np.zeros((0, self.dims), np.float32)


def reference_stats(inception, reference, cache_dir: str):
    """(mu, sigma) of the reference images (a folder of image files, or an array [N, H, W, 3]),
    computed once and kept in cache_dir/fid_reference_<key>.npz; the key is the reference set
    (file names, sizes and times; or the array's bytes) and the network (`inception.identity`)."""
    if isinstance(reference, str):
        if reference.endswith(".npz"):  # precomputed, as pytorch-fid's --save-stats writes
            with np.load(reference) as f:
                return f["mu"], f["sigma"]
        paths = _image_files(reference)
        about = [os.path.abspath(reference)] + [
            (os.path.basename(p), os.path.getsize(p), os.path.getmtime(p)) for p in paths]
        digest = hashlib.sha256(json.dumps(about).encode())
    else:
        reference = np.asarray(reference)
        digest = hashlib.sha256(f"{reference.shape}{reference.dtype}".encode())
        digest.update(np.ascontiguousarray(reference).tobytes())
    digest.update(inception.identity.encode())
    path = os.path.join(cache_dir, f"fid_reference_{digest.hexdigest()[:16]}.npz")
    # Several processes: all read the cache or all compute (the computation has collectives),
    # and process 0 alone writes it.
    if all(distributed.gather(os.path.exists(path))):
        with np.load(path) as f:
            return f["mu"], f["sigma"]
    acts = (inception.activations_of_files(paths) if isinstance(reference, str)
            else inception.activations(reference))
    mu, sigma = statistics(acts)
    if jax.process_index() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(path + ".tmp.npz", mu=mu, sigma=sigma, num=len(acts))
        os.replace(path + ".tmp.npz", path)  # a run stopped midway leaves no half-written cache
    return mu, sigma


def _image_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"fid reference {folder!r}: not a folder of images (or an .npz "
                                "of mu and sigma)")
    paths = sorted({p for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)
                    for p in glob.glob(os.path.join(folder, f"*.{ext}"))})
    if len(paths) < 2:
        raise ValueError(f"fid reference {folder!r}: {len(paths)} image files; expected at least 2")
    return paths


def _captions_and_reference(data, num: int, captions: str, reference: str):
    """(num captions, reference folder / .npz / uint8 array): the files given, else the shapes
    world's held-out scenes (their captions, and their rendered images as the reference)."""
    if not (captions and reference) and data.image_source != "shapes":
        raise ValueError("fid: give captions (a text file, one caption a line) and reference (a "
                         "folder of images, or an .npz of mu and sigma); only runs on the shapes "
                         f"world have defaults (data.image_source={data.image_source!r})")
    held = None if captions and reference else heldout_scenes(data.shapes_seed, num,
                                                              data.image_size)
    if captions:
        if not os.path.isfile(captions):
            raise FileNotFoundError(f"fid captions file {captions!r} does not exist")
        with open(captions) as f:
            lines = [line.strip() for line in f if line.strip()]
        if len(lines) < num:
            raise ValueError(f"fid captions file {captions!r} has {len(lines)} captions; num={num}")
        texts = lines[:num]
    else:
        texts = held[0]
    if reference.endswith(".npz") and not os.path.isfile(reference):
        raise FileNotFoundError(f"fid reference statistics {reference!r} do not exist")
    if reference and not reference.endswith(".npz"):
        _image_files(reference)
    return texts, reference or np.stack(held[1])


class Evaluator:
    def __init__(self, context, num: int = 5000, batch: int = 32, inception: str = "",
                 random_weights: bool = False, dims: int = 2048, captions: str = "",
                 reference: str = "", sampler: str = "ddpm", steps: int = 250,
                 guidance: float = 3.0, seed: int = 0, cache_dir: str = "", log_every: int = 10,
                 clip_weights: str = "", clip_vocab: str = "",
                 clip_model: str = clip_net.DEFAULT_ARCH, clip_normalize: str = "openai",
                 clip_random_weights: bool = False):
        config = context.config
        if num < 2 or batch < 1:
            raise ValueError(f"num={num}, batch={batch}: expected num >= 2, batch >= 1")
        use_clip = bool(clip_weights or clip_vocab or clip_random_weights)
        if use_clip:  # before any work: the files, a known model and normalization
            clip_score.check_options(clip_weights, clip_vocab, clip_model, clip_normalize,
                                     random_weights=clip_random_weights)
        if not inception and not random_weights:
            raise ValueError(f"inception: the path of pytorch-fid's weight file "
                             f"{inception_net.FID_WEIGHTS_FILE} (from "
                             f"{inception_net.FID_WEIGHTS_URL}); or random_weights=True for a "
                             "random network, reported as fid_random_weights (not FID)")
        self.inception = Inception(inception or None, dims, batch, seed, log_every)
        self.captions, self.reference = _captions_and_reference(config.data, num, captions,
                                                                reference)
        self.name = (f"fid{'' if dims == 2048 else dims}"
                     + ("_random_weights" if self.inception.random else ""))
        self.sampling = Sampling(sampler=sampler, steps=steps, guidance=guidance,
                                 max_new_tokens=1, num_samples=1, seed=seed)
        self.config, self.tokenizer, self.log_every = config, context.tokenizer, log_every
        self.specials = generation.Specials.from_tokenizer(context.tokenizer)
        self.generator = make_generator(config, self.specials, self.sampling)
        self.length = max(len(context.tokenizer.encode(c)) for c in self.captions) + 2  # BOS, BOI
        if self.length > config.data.seq_len:
            raise ValueError(f"fid: a caption is {self.length} tokens long; the model's context "
                             f"(data.seq_len) is {config.data.seq_len}")
        self.uncond = (generation.build_prompt([[[self.specials.boi]]] * batch, config.model,
                                               self.specials)
                       if guidance not in (0.0, 1.0) else None)
        self.decode = _batch_decoder(context.codec or loader.load_codec(
            config.autoencoder, family(config.model)))
        self.cache_dir = cache_dir or os.path.join(context.workdir, "fid_cache")
        self.clip = (clip_score.ClipScorer(clip_weights, clip_vocab, clip_model, batch,
                                           clip_normalize, clip_random_weights, seed)
                     if use_clip else None)
        self.clip_name = "clip_score" + ("_random_weights" if clip_random_weights else "")
        self._clip_texts = {}  # batch index -> its captions' CLIP embeddings (first run)

    def generate(self, variables, captions, key) -> np.ndarray:
        """Up to `batch` captions -> uint8 images [n, H, W, 3] (the batch padded, one compile)."""
        sp, b = self.specials, self.inception.batch
        rows = [[self.tokenizer.encode(c), [sp.boi]] for c in captions]
        rows += [rows[-1]] * (b - len(rows))
        prompt = generation.build_prompt(rows, self.config.model, sp, length=self.length)
        result = self.generator(variables, prompt, key, uncond=self.uncond,
                                guidance=self.sampling.guidance, max_new_tokens=1, max_images=1)
        return to_uint8(self.decode(result.images[:, 0]))[:len(captions)]

    def run(self, variables, out_dir: str) -> dict:
        ref_mu, ref_sigma = reference_stats(self.inception, self.reference, self.cache_dir)
        key, b, n = jax.random.key(self.sampling.seed), self.inception.batch, len(self.captions)
        made, t0 = {}, time.perf_counter()  # batch index -> (activations, cosines, samples)
        for j, i in enumerate(range(0, n, b)):
            if distributed.mine(j):  # the noise of batch j is fold_in(key, its first image)
                made[j] = self._measure(j, self.generate(variables, self.captions[i:i + b],
                                                         jax.random.fold_in(key, i)), i)
            if self.log_every and (j + 1) % self.log_every == 0:
                distributed.log(f"fid: {min(n, i + b)}/{n} images generated and measured "
                                f"({sum(len(m[0]) for m in made.values())} here) in "
                                f"{time.perf_counter() - t0:.0f}s")
        acts, cosines, samples = zip(*distributed.gather_batches(made))
        mu, sigma = statistics(np.concatenate(acts))
        scores = {self.name: frechet_distance(mu, sigma, ref_mu, ref_sigma)}
        if self.clip is not None:
            scores[self.clip_name] = clip_score.clip_score(np.concatenate(cosines))
        if out_dir:
            self._write(out_dir, mu, sigma, [im for batch in samples for im in batch],
                        np.concatenate(cosines) if self.clip is not None else None)
        return scores

    def _measure(self, j: int, images, start: int):
        """(pool3 activations, CLIP cosines or None, the images among the first 16 to show) of
        batch j, whose first image is caption `start`."""
        acts = self.inception.features(images)
        if self.clip is None:
            return acts, None, images[:max(0, 16 - start)]
        if j not in self._clip_texts:  # the captions' embeddings, kept across evaluations
            self._clip_texts[j] = self.clip.text_embeddings(
                self.captions[start:start + len(images)])
        cosines = (self.clip.image_embeddings(images) * self._clip_texts[j]).sum(-1)
        return acts, cosines, images[:max(0, 16 - start)]

    def _write(self, out_dir, mu, sigma, samples, cosines) -> None:
        np.savez(os.path.join(out_dir, "generated_stats.npz"), mu=mu, sigma=sigma,
                 num=len(self.captions))
        save_grid(os.path.join(out_dir, "samples.png"),
                  [samples[j:j + 8] for j in range(0, len(samples), 8)])
        if cosines is not None:
            np.save(os.path.join(out_dir, "clip_cosines.npy"), cosines)


def _batch_decoder(codec):
    """Latents [B, h, w, C] (a VQ-VAE: code ids [B, h, w]) -> pixels [B, H, W, 3] in [-1, 1]
    through the frozen codec, jitted. Its variables are closed over, as inference/tasks.py does:
    restored onto one device, as arguments they would clash with the run's mesh when the
    evaluators run on it (python -m transfusion_jax.evaluate on a multi-device mesh)."""
    if codec.kind == "identity":
        return lambda z: np.clip(np.asarray(z), -1.0, 1.0)
    if codec.kind == "vq":
        decode_ids = jax.jit(lambda ids: jnp.clip(codec.decode_ids(codec.variables, ids),
                                                  -1.0, 1.0))
        return lambda ids: np.asarray(decode_ids(ids))
    decode = jax.jit(lambda z: jnp.clip(codec.decode(codec.variables, z), -1.0, 1.0))
    return lambda z: np.asarray(decode(z))
