"""CIDEr-D (Vedantam et al., 2015) exactly as pycocoevalcap's `Cider` scorer computes it.

The paper (section 4.1, "Evaluation") reports CIDEr of greedy captions on the MS-COCO Karpathy
test split; the number in every COCO table is pycocoevalcap's `cider/cider_scorer.py`, which is
CIDEr-D: n-grams n = 1..4 of whitespace-split (pre-tokenised) strings, tf-idf weights with
document frequencies over the *references of the evaluated set* (an n-gram's df is the number of
images whose references hold it; idf = log(num images) - log(max(1, df))), per n the cosine
similarity of candidate and each reference with the candidate's weights clipped by the
reference's (min(w_c, w_r) * w_r), a Gaussian length penalty exp(-delta^2 / (2 sigma^2)) with
sigma 6, averaged over n and over references, times 10; the corpus score is the mean over images.
One quirk is kept for parity: pycocoevalcap's "length" is the number of *bigrams* of a sentence
(`if n == 1` on the 0-based n-gram order), i.e. words - 1 (0 for one word).

    score, per_image = cider_d(candidates, references)  # [str], [[str, ...]], tokenised
    tokens = tokenize("A red circle, in the top-left.")  # -> "a red circle in the top-left"

`tokenize` is a pure-Python stand-in for pycocoevalcap's tokenizer (Stanford CoreNLP's Java
PTBTokenizer run with -preserveLines -lowerCase, then the punctuation tokens of its PUNCTUATIONS
list dropped). COCO numbers come from the Java tokenizer; ours agrees with it on plain ASCII
captions of words, commas and full stops (ours: lowercase, split off punctuation and the clitics
n't 's 're 've 'll 'm 'd, drop punctuation, brackets and quotes). It differs where PTB has
special rules: abbreviations keep their dots in PTB ("u.s.", "mr.") and are split here ("u s",
"mr"); PTB rewrites brackets to -LRB-/-RRB- and quotes to ``/'' (dropped here outright); PTB
handles non-ASCII text, URLs, emoticons and some contractions ("gonna", "cannot") that we leave
as they are.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

# pycocoevalcap/tokenizer/ptbtokenizer.py's PUNCTUATIONS, and the raw brackets and quotes that
# PTB would have rewritten into its bracket/quote tokens first.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?",
                          "!", ",", ":", "-", "--", "...", ";", '"', "(", ")", "[", "]", "{",
                          "}"])
_TOKEN = re.compile(r"""
      [a-z]+(?=n't\b)                # do|n't, ca|n't
    | n't\b
    | '(?:s|re|ve|ll|m|d)\b          # clitics: it|'s, we|'re
    | \d+(?:[.,:]\d+)+               # 3.5, 1,000, 10:30
    | [a-z0-9]+(?:[-/&][a-z0-9]+)*   # words, hyphenated words, and/or
    | \.\.\.|--|\S                   # any other character is a token of its own
    """, re.VERBOSE)


def tokenize(caption: str) -> str:
    """A caption as the space-joined, lowercased, punctuation-free tokens CIDEr reads (see the
    module docstring for how this differs from pycocoevalcap's Java PTBTokenizer)."""
    tokens = _TOKEN.findall(caption.replace("\n", " ").lower())
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def ngram_counts(sentence: str, n: int = 4) -> Counter:
    """{n-gram tuple: count} for orders 1..n of the whitespace-split sentence (`precook`)."""
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                   for i in range(len(words) - k + 1))


def document_frequency(references: Sequence[Sequence[Counter]]) -> Counter:
    """{n-gram: number of images whose references contain it}."""
    df = Counter()
    for refs in references:
        df.update(set().union(*refs))
    return df


def _tfidf(counts: Counter, df: Counter, log_images: float, n: int):
    """(per order a {n-gram: weight} dict, per order the norm, the bigram count) (`counts2vec`)."""
    vec = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = float(tf) * (log_images - np.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)  # pycocoevalcap's quirk
    return vec, norms, length


def _similarity(hyp, ref, sigma: float) -> np.ndarray:
    """Per order: the clipped cosine similarity times the Gaussian length penalty (`sim`)."""
    (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
    penalty = np.e ** (-(float(len_h - len_r) ** 2) / (2 * sigma ** 2))
    out = np.zeros(len(vec_h))
    for k, (v_h, v_r) in enumerate(zip(vec_h, vec_r)):
        out[k] = sum(min(w, v_r.get(g, 0.0)) * v_r.get(g, 0.0) for g, w in v_h.items())
        if norm_h[k] != 0 and norm_r[k] != 0:
            out[k] /= norm_h[k] * norm_r[k]
        out[k] *= penalty
    return out


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """(corpus CIDEr-D, per-image scores [num images]) of one tokenised candidate per image
    against its tokenised references (at least one each), as pycocoevalcap's
    `Cider(n, sigma).compute_score(gts, res)`."""
    if len(candidates) != len(references):
        raise ValueError(f"cider_d: {len(candidates)} candidates for {len(references)} reference "
                         "lists; expected one candidate per image")
    if not candidates:
        raise ValueError("cider_d: no images to score")
    if any(not refs for refs in references):
        raise ValueError("cider_d: every image needs at least one reference")
    refs = [[ngram_counts(r, n) for r in rs] for rs in references]
    df, log_images = document_frequency(refs), np.log(float(len(candidates)))
    scores = np.zeros(len(candidates))
    for i, (cand, rs) in enumerate(zip(candidates, refs)):
        hyp = _tfidf(ngram_counts(cand, n), df, log_images, n)
        total = sum(_similarity(hyp, _tfidf(r, df, log_images, n), sigma) for r in rs)
        scores[i] = np.mean(total) / len(rs) * 10.0
    return float(np.mean(scores)), scores
