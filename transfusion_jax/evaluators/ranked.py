"""Ranked classification (type "ranked"): multiple-choice accuracy exactly as
lm-evaluation-harness defines `acc` and `acc_norm` (paper section 4.1: the Llama 2 suite,
"average 0-shot accuracy").

lm-eval (EleutherAI/lm-evaluation-harness, lm_eval/api/task.py `construct_requests` and
`process_results` for output_type multiple_choice; lm_eval/api/model.py `TemplateLM`):
  * each choice is a request loglikelihood(context, " " + choice) (target_delimiter " ");
  * `_encode_pair`: trailing whitespace of the context moves to the continuation; then
    whole = encode(context + continuation), ctx = encode(context) and the continuation tokens
    are whole[len(ctx):]. The model reads ctx + continuation tokens, and the choice's score is
    the summed log-probability of the continuation tokens;
  * acc = [argmax(lls) == label]; acc_norm = [argmax(lls / len(choice)) == label], len in
    characters of the choice string without the delimiter (`completion_len`; lm-eval's
    `acc_bytes` divides by UTF-8 bytes instead). np.argmax: the first of equal scores wins.
Ours: BOS always starts the sequence (our documents start with it; lm-eval uses its prefix
token for an empty context); a text-only sequence longer than a row keeps its last seq_len
tokens (lm-eval keeps the last max_length + 1).

Tasks: `path`, a local JSONL of {"context", "choices", "label"}; or `tfds`, a task of the Llama 2
suite read through `tfds.data_source` ("hellaswag", "piqa", "winogrande", "ai2_arc/ARC-Easy",
"ai2_arc/ARC-Challenge", "bool_q", "openbookqa", "cos_e" for commonsense_qa; `split` defaults
to the split lm-eval scores, `data_dir`; prepared beforehand, an unprepared set is an error
naming the `tfds build` command), each record made into an example as lm-eval's task YAML makes
it (llama_suite.py, which also converts Hugging Face files of the tasks TFDS lacks, Social IQa
and CommonsenseQA, into the JSONL); or, without either, `num` generated questions about
held-out shapes scenes (shapes_choices.py; `seed`). `num` with a path or tfds: the first num
examples (default all). An example may instead be {"contexts": [...], "continuation", "label"}:
lm-eval's partial evaluation ("multiple inputs", winogrande), where each choice is a context,
the requests are (context_j, " " + continuation) and acc_norm divides by len(context_j), the
length of lm-eval's doc_to_choice there. The shapes questions' context
is an image, then text: the image enters as clean latents at t = 0 between BOI and EOI, as
generation reads prompt images (inference/generation.py prefill). Scoring is one full forward
over packed rows (model batch contract), not the KV-cached generator: that forward is what the
cache is tested against, needs no decoding loop, and lets many (context, choice) sequences share
a row, each its own segment. Rows have the training shape [batch_size, data.seq_len], jitted
once; with several processes each scores its batches (evaluators/common.py). Writes
scores.jsonl (per example: log-likelihoods, predictions) into out_dir.

Either model family (config.model.family): a Chameleon run's image context is its VQ-VAE's code
ids inside the tokens (BOI, text_vocab_size + code ..., EOI, as its training rows hold them), and
only the continuation's text tokens are scored, as for Transfusion.
"""
from __future__ import annotations

import json
import os

import numpy as np

from transfusion_jax.core import distributed
from transfusion_jax.data.config import resolve_max_images
from transfusion_jax.data.documents import load_image
from transfusion_jax.evaluators import common, llama_suite
from transfusion_jax.evaluators.perplexity import MODEL_KEYS, batches, make_scorer, pack_whole
from transfusion_jax.evaluators.shapes_choices import shapes_questions
from transfusion_jax.inference.tasks import image_codec
from transfusion_jax.models import family, patches_per_image
from transfusion_jax.models.chameleon import text_vocab_size


def encode_pair(tokenizer, context: str, continuation: str):
    """(context tokens, continuation tokens) as lm-eval's `_encode_pair` splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    return list(ctx), list(whole[len(ctx):])


def requests(example: dict) -> list[tuple[str, str]]:
    """(context, continuation) of each choice, as lm-eval's multiple_choice requests them
    (target_delimiter " "): the choice after the context, or (multiple inputs) the one
    continuation after each choice's context."""
    if "contexts" in example:
        return [(c, " " + example["continuation"]) for c in example["contexts"]]
    return [(example["context"], " " + c) for c in example["choices"]]


def choice_texts(example: dict) -> list[str]:
    """lm-eval's doc_to_choice of the example, whose lengths acc_norm divides by."""
    return list(example["contexts"] if "contexts" in example else example["choices"])


def _well_formed(e) -> bool:
    if "contexts" in e:
        n = len(e["contexts"])
        texts = all(isinstance(c, str) and c for c in e["contexts"]) and isinstance(
            e["continuation"], str)
    else:
        n = len(e["choices"])
        texts = isinstance(e["context"], str) and all(isinstance(c, str) and c
                                                      for c in e["choices"])
    return texts and n >= 2 and isinstance(e["label"], int) and 0 <= e["label"] < n


def read_jsonl(path: str, num: int | None = None) -> list[dict]:
    """Examples {"context", "choices", "label"} (or {"contexts", "continuation", "label"}) of a
    JSONL file, the first `num` (None: all); a bad line is named."""
    if not os.path.exists(path):
        raise ValueError(f"ranked: path={path!r}: no such file; expected a JSONL of "
                         '{"context": str, "choices": [str, ...], "label": int}')
    out = []
    for e in common.read_jsonl_records(
            "ranked", path, num, _well_formed,
            '{"context": str, "choices": [non-empty str, ...] (>= 2), "label": index} or '
            '{"contexts": [non-empty str, ...] (>= 2), "continuation": str, "label": index}'):
        if "contexts" in e:
            out.append({"contexts": list(e["contexts"]), "continuation": e["continuation"],
                        "label": e["label"]})
        else:
            out.append({"context": e["context"], "choices": list(e["choices"]),
                        "label": e["label"]})
    if not out:
        raise ValueError(f"ranked: {path} has no examples")
    return out


def choice_accuracy(lls, choices, label) -> dict:
    """lm-eval's multiple-choice metrics of one example."""
    lls = np.asarray(lls, np.float64)
    pred = int(np.argmax(lls))
    pred_norm = int(np.argmax(lls / np.array([float(len(c)) for c in choices])))
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == label),
            "acc_norm": float(pred_norm == label)}


class Evaluator:
    def __init__(self, context, path: str = "", tfds: str = "", split: str = "",
                 data_dir: str = "", num: int | None = None, seed: int = 0,
                 batch_size: int = 0, log_every: int = 100):
        config, tok = context.config, context.tokenizer
        data, cfg = config.data, config.model
        if num is not None and num < 1:
            raise ValueError(f"ranked: num={num}: expected an integer >= 1 (or unset)")
        if path and tfds:
            raise ValueError(f"ranked: path={path!r} and tfds={tfds!r}: give one of them")
        if (split or data_dir) and not tfds:
            raise ValueError("ranked: split and data_dir are options of tfds=")
        self.task = ""
        if path:
            self.examples = read_jsonl(path, num)
        elif tfds:
            self.task, self.examples = llama_suite.load_tfds(tfds, split, num, data_dir)
        else:
            if data.image_source != "shapes":
                raise ValueError(f"ranked: without `path` or `tfds` it asks num={num or 64} "
                                 "questions about shapes scenes; data.image_source="
                                 f"{data.image_source!r}")
            self.examples = shapes_questions(num or 64, data.image_size, seed, data.shapes_seed)
        self.images = "image" in self.examples[0]
        self.length, self.log_every = data.seq_len, log_every
        self.batch_size = batch_size or data.batch_size
        p = patches_per_image(cfg)
        # Chameleon: images are code ids in the tokens, its rows text-only for the scorer.
        self.image_ids = family(cfg) == "chameleon"
        self.latents_in = self.images and not self.image_ids
        self.offset = text_vocab_size(cfg) if self.image_ids else 0
        self.slots = resolve_max_images(data, p) if self.latents_in else 1
        shape = (cfg.latent_size, cfg.latent_size, cfg.latent_channels)
        self.layout = dict(L=data.seq_len, M=self.slots, P=p, image_size=data.image_size,
                           pad_id=tok.pad_id, boi_id=tok.boi_id,
                           num_timesteps=data.num_timesteps, latent_shape=shape)
        encode = image_codec(config, context.codec)[0] if self.images else None
        self.docs, self.scored, self.pairs = [], [], []
        for i, e in enumerate(self.examples):
            latent = encode(load_image(e["image"], data.image_size)) if self.images else None
            for j, (ctx, continuation) in enumerate(requests(e)):
                doc, c = self._document(tok, ctx, continuation, latent, p, shape)
                self.docs.append(doc)
                self.scored.append(c)
                self.pairs.append((i, j))
        self.score = make_scorer(cfg)

    def _document(self, tok, context, continuation, latent, p, shape):
        """(document of the pair, number of continuation tokens)."""
        ctx, cont = encode_pair(tok, context, continuation)
        head = [tok.bos_id]
        if latent is not None and self.image_ids:  # Chameleon: the code ids, offset
            head += [tok.boi_id, *(self.offset + np.asarray(latent).reshape(-1)), tok.eoi_id]
        elif latent is not None:
            head += [tok.boi_id] + [tok.pad_id] * p + [tok.eoi_id]
        tokens = np.asarray(head + ctx + cont, np.int32)
        if len(tokens) > self.length:
            if latent is not None or len(cont) >= self.length:
                raise ValueError(f"ranked: context {context[:40]!r}... with continuation "
                                 f"{continuation[:40]!r} is {len(tokens)} elements; "
                                 f"data.seq_len is {self.length}")
            tokens = tokens[-self.length:]
        slot = latent is not None and not self.image_ids
        images = latent[None] if slot else np.zeros((0, *shape), np.float32)
        return {"tokens": tokens, "boi": np.asarray([1] if slot else [], np.int32),
                "images": np.asarray(images, np.float32),
                "max_timestep": np.full(len(images), self.layout["num_timesteps"], np.int32)
                }, len(cont)

    def loglikelihoods(self, variables) -> np.ndarray:
        """Summed log-probability of each pair's continuation tokens, float64 [pairs]; with
        several processes each scores its batches (evaluators/common.py)."""
        scored, done = {}, 0  # batch index -> [(pair, log-likelihood)]
        rows = pack_whole(enumerate(self.docs), self.length, self.slots)
        for i, (batch, keys) in enumerate(batches(rows, self.batch_size, self.layout)):
            if distributed.mine(i):
                latents = batch["latents"] if self.latents_in else None
                logp = np.asarray(self.score(variables, {k: batch[k] for k in MODEL_KEYS},
                                             latents))
                scored[i] = self._continuations(logp, keys)
                done += len(scored[i])
            if (i + 1) % self.log_every == 0:
                distributed.log(f"ranked: {i + 1} batches, {done} of {len(self.docs)} "
                                "(context, choice) pairs scored here")
        lls = np.zeros(len(self.docs))
        for pairs in distributed.gather_batches(scored):
            for key, ll in pairs:
                lls[key] = ll
        return lls

    def _continuations(self, logp, keys) -> list[tuple[int, float]]:
        """(pair, summed log-probability of its continuation) of each pair in a batch's rows."""
        out = []
        for r, row in enumerate(keys):
            at = 0
            for key in row:
                n, c = len(self.docs[key]["tokens"]), self.scored[key]
                ll = logp[r, at + n - c - 1:at + n - 1].astype(np.float64).sum()
                out.append((key, float(ll)))
                at += n
        return out

    def run(self, variables, out_dir: str) -> dict:
        lls = self.loglikelihoods(variables)
        per_example = [[] for _ in self.examples]
        for (i, _), ll in zip(self.pairs, lls):
            per_example[i].append(float(ll))
        records = []
        for i, (e, ex_lls) in enumerate(zip(self.examples, per_example)):
            shown = ({"contexts": e["contexts"], "continuation": e["continuation"]}
                     if "contexts" in e else {"context": e["context"], "choices": e["choices"]})
            records.append({"index": i, **shown, "label": e["label"], "loglikelihoods": ex_lls,
                            **choice_accuracy(ex_lls, choice_texts(e), e["label"])})
        if out_dir:
            with open(os.path.join(out_dir, "scores.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        return {"acc": float(np.mean([r["acc"] for r in records])),
                "acc_norm": float(np.mean([r["acc_norm"] for r in records])),
                "n": len(records)}
