"""Perplexity and bits per byte on held-out text (type "perplexity"; paper section 4.1: "we
report perplexity on 20M held-out tokens").

Options: source ("shapes" | "tfds" | "text_files"; default the run's data.text_source),
tokens (at least this many tokens are scored; paper: 20M), batch_size (rows per forward;
default data.batch_size), log_every (a progress line every this many batches), and per source:
  shapes      the world's "heldout" split of text documents (data.shapes_seed);
  tfds        tfds_name (default data.tfds_name), split ("validation"), tfds_data_dir,
              text_key (defaults from config.data); read through `tfds.data_source`, prepared
              beforehand (a missing set is an error naming it and the `tfds build` command);
  text_files  path: a held-out .txt / .jsonl / folder of .txt, as data.text_files_path reads.

Each document is tokenised with the run's tokenizer exactly as training builds text documents
(BOS text EOS, documents.DocumentBuilder) and packed whole, left to right, into rows of
data.seq_len (packing.assemble_row: segments, positions, targets, text_weights as in training).
A document longer than a row is cut first into windows of seq_len tokens that overlap by one
token (lm-evaluation-harness's rolling windows with context 1): the packer then never splits, and
every token after BOS (the text's tokens and EOS) is the target of exactly one element. Whole
documents are taken in source order until at least `tokens` targets are reached.

    perplexity    = exp(total nll / n),  n = scored targets (text tokens + EOS), "tokens"
    bits_per_byte = total nll / ln 2 / B, B = UTF-8 bytes of the scored documents' text

B counts exactly the text whose tokens are scored: every token of every taken document is a
target (no document is truncated, no token is lost at a cut), so the nll covers all of B (plus
each document's EOS, as the training loss does). The model's forward is jitted once for a fixed
[batch_size, seq_len] batch (the last batch is padded with empty rows); with several processes
each scores its batches (evaluators/common.py) and the sums are added in batch order. Writes
documents.jsonl (per document: tokens, bytes, nll) into out_dir.

Either model family (config.model.family, models.build_model): the rows are text only, so a
Chameleon run's perplexity counts text tokens only, as Transfusion's does (its logits still
spread over the image ids too: the text probability is what the model gives text).
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from transfusion_jax.core import distributed
from transfusion_jax.data import sources
from transfusion_jax.data.documents import DocumentBuilder, SkipDocument, decode_text
from transfusion_jax.data.packing import assemble_row
from transfusion_jax.models import build_model

MODEL_KEYS = ("tokens", "segment_ids", "positions", "mask_pos", "patch_index",
              "patch_positions", "targets", "text_weights")
SOURCES = ("shapes", "tfds", "text_files")


# ---------------------------------------------------------------------------------------------
# Shared with ranked.py: scoring packed rows.

def make_scorer(model_cfg):
    """jit(variables, batch, latents) -> log p(target) [B, L] float32, 0 where text_weights is 0.
    `latents` [B, M, h, w, C] are clean images (t = 0, as generation reads prompt images), or
    None for text-only rows (a Chameleon model takes only those: its images are ids inside
    `tokens`). The log-probability is -cross-entropy, as the training loss has it."""
    model = build_model(model_cfg)

    def score(variables, batch, latents):
        t = None if latents is None else jnp.zeros(latents.shape[:2], jnp.int32)
        logits = model.apply(variables, batch, latents, t)["logits"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return -ce * batch["text_weights"]

    return jax.jit(score)


def pack_whole(docs, length: int, slots: int):
    """(key, doc) pairs -> per row the list of (key, doc) placed in it. Training's packer
    (packing.py) with documents that all fit a row: a document goes into the current row if its
    elements and images fit, else the row closes and the document starts the next."""
    row, used, images = [], 0, 0
    for key, doc in docs:
        n, k = len(doc["tokens"]), len(doc["boi"])
        if n > length or k > slots:
            raise ValueError(f"document {key!r} has {n} elements and {k} images; a row holds "
                             f"{length} and {slots}")
        if row and (used + n > length or images + k > slots):
            yield row
            row, used, images = [], 0, 0
        row.append((key, doc))
        used, images = used + n, images + k
    if row:
        yield row


def batches(rows, size: int, layout: dict):
    """Rows (lists of (key, doc)) -> (batch dict of [size, ...] arrays, keys per row); the last
    batch is padded with empty rows (segment 0, no targets) so every batch has one shape."""
    group = []
    for row in rows:
        group.append(row)
        if len(group) == size:
            yield _stack(group, layout)
            group = []
    if group:
        yield _stack(group + [[]] * (size - len(group)), layout)


def _stack(group, layout):
    built = [assemble_row([(doc, 0, len(doc["tokens"])) for _, doc in row], **layout)
             for row in group]
    return ({k: np.stack([r[k] for r in built]) for k in built[0]},
            [[key for key, _ in row] for row in group])


def segment_sums(logp: np.ndarray, segment_ids: np.ndarray) -> list[np.ndarray]:
    """Per row, the float64 sum of log-probabilities of each segment (index 0: padding)."""
    return [np.bincount(s, weights=lp.astype(np.float64), minlength=s.max() + 1)
            for lp, s in zip(logp, segment_ids)]


# ---------------------------------------------------------------------------------------------
# Held-out text.

def windows(tokens: np.ndarray, length: int) -> list[np.ndarray]:
    """A document's tokens in pieces of at most `length`, overlapping by one token: every token
    but the first is a target in exactly one piece."""
    if len(tokens) <= length:
        return [tokens]
    return [tokens[s:s + length] for s in range(0, len(tokens) - 1, length - 1)]


def open_source(data, source: str, tfds_name: str, split: str, tfds_data_dir: str,
                text_key: str, path: str):
    """The held-out text source; a missing data set or file is an error naming it."""
    if source == "shapes":
        return sources.ShapesSource("text", seed=data.shapes_seed, split="heldout",
                                    num_documents=2**31 - 1, image_size=data.image_size,
                                    interleaved_fraction=0.0)
    if source == "text_files":
        if not path:
            raise ValueError("perplexity: source 'text_files' needs `path`, a held-out .txt, "
                             ".jsonl or folder of .txt (not the training file)")
        return sources.TextFilesSource(path)
    try:
        return sources.TfdsTextSource(tfds_name, split=split, data_dir=tfds_data_dir,
                                      text_key=text_key)
    except Exception as e:  # tfds says "not supported"/"not found" in many ways
        raise ValueError(
            f"perplexity: TFDS data set {tfds_name!r} (split {split!r}) is not prepared in "
            f"{tfds_data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:160]}); "
            f"prepare it first: tfds build {tfds_name} --file_format=array_record"
            + (f" --data_dir={tfds_data_dir}" if tfds_data_dir else "")
            + " (nothing downloads at run time)") from None


class Evaluator:
    def __init__(self, context, source: str = "", tokens: int = 20_000_000, batch_size: int = 0,
                 log_every: int = 100, tfds_name: str = "", split: str = "validation",
                 tfds_data_dir: str = "", text_key: str = "", path: str = ""):
        data = context.config.data
        source = source or data.text_source
        if source not in SOURCES:
            raise ValueError(f"perplexity: source={source!r}: expected one of {SOURCES}")
        if tokens < 1 or batch_size < 0 or log_every < 1:
            raise ValueError(f"perplexity: tokens={tokens}, batch_size={batch_size}, "
                             f"log_every={log_every}: expected >= 1, >= 0 (0: data.batch_size)"
                             ", >= 1")
        self.source = open_source(data, source, tfds_name or data.tfds_name, split,
                                  tfds_data_dir or data.tfds_data_dir,
                                  text_key or data.tfds_text_key, path)
        self.name, self.tokens, self.log_every = source, tokens, log_every
        self.batch_size, self.length = batch_size or data.batch_size, data.seq_len
        tok = context.tokenizer
        self.builder = DocumentBuilder(tok, patches_per_image=1, image_size=1,
                                       caption_first_prob=1.0, p_uncond=0.0,
                                       num_timesteps=data.num_timesteps)
        self.layout = dict(L=self.length, M=1, P=1, image_size=1, pad_id=tok.pad_id,
                           boi_id=tok.boi_id, num_timesteps=data.num_timesteps,
                           latent_shape=(1, 1, 1))
        self.score = make_scorer(context.config.model)

    def documents(self, stats: list):
        """(key, window) of the held-out documents, in source order, until `tokens` targets;
        appends (tokens, bytes) per document to `stats` (key = (document, window))."""
        total = 0
        for index in range(len(self.source)):
            if total >= self.tokens:
                return
            try:
                text = decode_text(self.source[index].get("text"), "empty_text")
            except SkipDocument:
                continue
            doc = self.builder({"text": text}, np.random.default_rng(0))
            stats.append((len(doc["tokens"]) - 1, len(text.encode("utf-8"))))
            total += stats[-1][0]
            for w, piece in enumerate(windows(doc["tokens"], self.length)):
                yield (len(stats) - 1, w), {"tokens": piece, "boi": doc["boi"],
                                            "images": doc["images"],
                                            "max_timestep": doc["max_timestep"]}
        if total < self.tokens:
            distributed.log(f"perplexity: the {self.name} source ended at {total} tokens "
                            f"(asked for {self.tokens})")

    def run(self, variables, out_dir: str) -> dict:
        stats, t0 = [], time.perf_counter()
        sums = {}  # batch index -> [(document, its log-probability in the batch)]
        rows = pack_whole(self.documents(stats), self.length, 1)
        # Every process packs every batch (stats, batch boundaries); each scores its own.
        for i, (batch, keys) in enumerate(batches(rows, self.batch_size, self.layout)):
            if distributed.mine(i):
                logp = np.asarray(self.score(variables, {k: batch[k] for k in MODEL_KEYS}, None))
                sums[i] = [(doc, float(s)) for row_keys, row in zip(keys, segment_sums(
                    logp, batch["segment_ids"])) for (doc, _), s in zip(row_keys, row[1:])]
            if (i + 1) % self.log_every == 0:
                self._progress(i + 1, stats, sums, time.perf_counter() - t0)
        return self._report(stats, _nll(distributed.gather_batches(sums)), out_dir)

    def _progress(self, done: int, stats, sums, seconds: float) -> None:
        """A progress line; "so far": of the batches this process scored."""
        nll = _nll(sums.values())
        n = sum(stats[doc][0] for doc in nll)
        distributed.log(f"perplexity: {done} batches ({len(sums)} here), {n} tokens, "
                        f"{seconds:.0f}s, perplexity so far "
                        f"{math.exp(sum(nll.values()) / max(n, 1)):.4g}")

    def _report(self, stats, nll, out_dir):
        n, size = sum(t for t, _ in stats), sum(b for _, b in stats)
        if not n:
            raise ValueError(f"perplexity: the {self.name} source has no usable text documents")
        total = sum(nll.values())
        if out_dir:
            with open(os.path.join(out_dir, "documents.jsonl"), "w") as f:
                for doc, (tokens, nbytes) in enumerate(stats):
                    f.write(json.dumps({"document": doc, "tokens": tokens, "bytes": nbytes,
                                        "nll": nll[doc]}) + "\n")
        return {"perplexity": math.exp(total / n),
                "bits_per_byte": total / math.log(2) / max(size, 1), "tokens": n}


def _nll(batch_sums) -> dict:
    """{document: nll} of per-batch [(document, log-probability)], summed in batch order (a
    document cut into windows spans batches)."""
    nll = {}
    for pairs in batch_sums:
        for doc, s in pairs:
            nll[doc] = nll.get(doc, 0.0) - s
    return nll
