"""An lm-evaluation-harness model (`lm-eval`, the optional extra `lmeval`) over a training run:
lm-eval's tasks drive our model through `loglikelihood`, `loglikelihood_rolling` and
`generate_until`, as Levanter's adapter drives its models (paper section 4.1: the Llama 2
suite). Text only: lm-eval's text tasks have no images, and a Chameleon run's image ids are never
generated (its text scores are what the model gives text, as the perplexity evaluator's are).

    pip install -e '.[lmeval]'
    python -m transfusion_jax.evaluators.lm_eval_adapter --model_args workdir=DIR \\
        --tasks hellaswag,piqa,arc_easy --output_path DIR/lm_eval
    python -m transfusion_jax.evaluators.lm_eval_adapter --model_args workdir=DIR,step=1000 \\
        --tasks my_task --include_path my_tasks/       # a YAML task over local files

This is lm-eval's own command line (`lm_eval ...`, every option of it), with `--model
transfusion_jax` filled in: lm-eval 0.4.13 has no plugin discovery for models (its registry
holds only what its `lm_eval.models` names, plus what the running process registers), so a plain
`lm_eval --model transfusion_jax` cannot find this class; this module registers it under that
name and then runs lm-eval's CLI. From Python: `lm_eval.simple_evaluate(model=TransfusionLM(
workdir=DIR), tasks=[...])`, or `model="transfusion_jax"` once this module is imported.

model_args: workdir (a Transfusion or Chameleon run: inference/loading.py, its EMA params when
kept, and its tokenizer.model), step (default: the latest checkpoint), rows (rows per forward,
default data.batch_size), max_gen_toks (default 256). lm-eval's --batch_size / --device are
accepted and not used: requests are packed into rows (below), so the forward's shape is fixed.

How each request is scored (lm-eval's definitions, lm_eval/api/model.py and utils.py):
  * loglikelihood(context, continuation): lm-eval's `TemplateLM` splits the pair (trailing
    whitespace of the context moves to the continuation; ctx = encode(context), continuation =
    encode(context + continuation)[len(ctx):]; an empty context becomes the prefix token, our
    BOS). The model reads BOS + ctx + continuation, as our documents start with BOS (the ranked
    evaluator's layout: evaluators/ranked.py, so both give the same scores), keeping the last
    data.seq_len tokens of a longer one. Result: (summed log p of the continuation tokens,
    whether each is the argmax).
  * loglikelihood_rolling(text): lm-eval's rolling windows (`get_rolling_token_windows`, the
    prefix token BOS, context 1, made disjoint) of at most data.seq_len tokens each (seq_len - 1
    predictions); every token of the text is predicted once, the last window with a full
    context; the sum over windows. No EOS is scored (the perplexity evaluator scores each
    document's EOS, as training does: the two differ by that one term).
  * generate_until(context, {until, max_gen_toks, ...}): greedy decoding with the KV-cached
    Generator (inference/generation.py: text only, no images; PAD, BOS, EOI and BOI never
    sampled), after BOS + the context's last data.seq_len - max_gen_toks - 1 tokens; it stops at
    EOS or after max_gen_toks tokens (at most seq_len - 1), and the text is cut before the first
    of the `until` strings. Sampling (do_sample, temperature > 0) is refused: greedy only.

Shapes: scored sequences are packed whole into rows of data.seq_len (several per row, each its
own segment; the model batch contract, as the ranked and perplexity evaluators pack them), in
batches of `rows`, so the scoring forward compiles once. Generation pads prompts to a power of two
(>= 16) and fills each batch to `rows` prompts: it compiles once per (prompt bucket,
max_gen_toks). One process, one local device (no sharding over a mesh).
"""
from __future__ import annotations

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models stay registered beside ours)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional extra
    raise ImportError("transfusion_jax.evaluators.lm_eval_adapter needs lm-evaluation-harness: "
                      "pip install -e '.[lmeval]' (lm-eval==0.4.13)") from e
from tqdm import tqdm

from transfusion_jax.data.tokenizer import TOKENIZER_FILE, get_tokenizer
from transfusion_jax.evaluators.perplexity import MODEL_KEYS, batches, pack_whole
from transfusion_jax.inference import tasks
from transfusion_jax.inference.generation import Specials, build_prompt
from transfusion_jax.inference.loading import load_for_inference
from transfusion_jax.models import build_model

NAME = "transfusion_jax"
MIN_BUCKET = 16


def make_forward(model_cfg):
    """jit(variables, batch) -> (log p(target) [B, L] float32, 0 where text_weights is 0;
    whether the target is the argmax of the logits [B, L])."""
    model = build_model(model_cfg)

    def forward(variables, batch):
        logits = model.apply(variables, batch, None, None)["logits"]
        logp = -optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return logp * batch["text_weights"], jnp.argmax(logits, -1) == batch["targets"]

    return jax.jit(forward)


def bucket(n: int) -> int:
    """The padded prompt length of an n-element prompt: a power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def cut_at_stops(text: str, until) -> str:
    """`text` before the first occurrence of any of the `until` strings (lm-eval's rule)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


@register_model(NAME)
class TransfusionLM(TemplateLM):
    """lm-eval's LM over a run's workdir, or over (config, variables, tokenizer) given directly
    (tests, or a training loop's current params)."""

    def __init__(self, workdir: str = "", step: int | None = None, rows: int = 0,
                 max_gen_toks: int = 256, config=None, variables=None, tokenizer=None,
                 batch_size=None, max_batch_size=None, device=None, **unused):
        super().__init__()
        if unused:
            raise ValueError(f"{NAME}: unknown model_args {sorted(unused)}; expected workdir, "
                             "step, rows, max_gen_toks")
        if config is None:
            if not workdir:
                raise ValueError(f"{NAME}: give model_args workdir=DIR (a training run with a "
                                 "checkpoint), or config, variables and tokenizer")
            config, variables = load_for_inference(workdir, None if step in (None, "") else
                                                   int(step))
            if "autoencoder" not in config:
                raise ValueError(f"{NAME}: {workdir} is an autoencoder run; lm-eval needs a "
                                 "Transfusion or Chameleon run's workdir")
            if not (config.data.tokenizer_model
                    or os.path.exists(os.path.join(workdir, TOKENIZER_FILE))):
                raise ValueError(f"{NAME}: {workdir} has no {TOKENIZER_FILE} and its "
                                 "data.tokenizer_model is empty: which tokenizer the run "
                                 "trained with is unknown")
            tokenizer = get_tokenizer(config.data, workdir)
        if variables is None or tokenizer is None:
            raise ValueError(f"{NAME}: with `config` give `variables` and `tokenizer` too")
        self.config, self.variables, self.tok = config, variables, tokenizer
        self.length = config.data.seq_len
        self.rows = int(rows) or config.data.batch_size
        self.max_gen_toks = int(max_gen_toks)
        if self.rows < 1 or self.max_gen_toks < 1:
            raise ValueError(f"{NAME}: rows={rows}, max_gen_toks={max_gen_toks}: expected >= 1")
        self.layout = {"L": self.length, "M": 1, "P": 1, "image_size": 1,
                       "pad_id": tokenizer.pad_id, "boi_id": tokenizer.boi_id,
                       "num_timesteps": config.data.num_timesteps, "latent_shape": (1, 1, 1)}
        self._forward = make_forward(config.model)
        self.specials = Specials.from_tokenizer(tokenizer)
        self._generator = None  # built on the first generate_until

    # lm-eval's TemplateLM hooks: tokens without BOS; BOS is the prefix of an empty context.
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # ------------------------------------------------------------------------------------------
    # Scoring.

    def score(self, sequences, disable_tqdm: bool = True):
        """sequences: (tokens, n) pairs -> per pair (summed log p of its last n tokens given the
        ones before, whether each of them is the argmax), through packed rows."""
        docs = []
        for i, (tokens, n) in enumerate(sequences):
            tokens = np.asarray(tokens, np.int32)[-self.length:]
            if not 1 <= n < len(tokens):
                raise ValueError(f"{NAME}: a request scores {n} tokens of {len(tokens)} (after "
                                 f"keeping the last data.seq_len={self.length}); expected 1 "
                                 "<= scored < all (a continuation shorter than a row)")
            docs.append((i, {"tokens": tokens, "boi": np.zeros(0, np.int32),
                             "images": np.zeros((0, 1, 1, 1), np.float32),
                             "max_timestep": np.zeros(0, np.int32)}))
        out = [None] * len(docs)
        rows = pack_whole(iter(docs), self.length, 1)
        bar = tqdm(total=len(docs), desc=f"{NAME}: scoring", disable=disable_tqdm)
        for batch, keys in batches(rows, self.rows, self.layout):
            logp, greedy = self._forward(self.variables, {k: batch[k] for k in MODEL_KEYS})
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for r, row in enumerate(keys):
                at = 0
                for key in row:
                    m, n = len(docs[key][1]["tokens"]), sequences[key][1]
                    span = slice(at + m - n - 1, at + m - 1)
                    out[key] = (float(logp[r, span].astype(np.float64).sum()),
                                bool(greedy[r, span].all()))
                    at += m
            bar.update(sum(len(row) for row in keys))
        bar.close()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation), context tokens, continuation tokens) as
        TemplateLM.loglikelihood encodes them; BOS starts every sequence."""
        bos = self.tok.bos_id
        sequences = [(([] if ctx[:1] == [bos] else [bos]) + list(ctx) + list(cont), len(cont))
                     for _, ctx, cont in requests]
        results = self.score(sequences, disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        sequences, owner = [], []
        for i, request in enumerate(requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.tok.bos_id,
                max_seq_len=self.length - 1, context_len=1)
            for ctx, cont in map(make_disjoint_window, windows):
                sequences.append((ctx + cont, len(cont)))
                owner.append(i)
        sums = np.zeros(len(requests))
        for i, (ll, _) in zip(owner, self.score(sequences, disable_tqdm)):
            sums[i] += ll
        for request, ll in zip(requests, sums):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), float(ll))
        return [float(ll) for ll in sums]

    # ------------------------------------------------------------------------------------------
    # Generation.

    def _options(self, kwargs):
        """(stop strings, token budget) of a request's generation kwargs; sampling is refused."""
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        budget = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise ValueError(f"{NAME}: generate_until decodes greedily; the task asks for "
                             "sampling (do_sample / temperature > 0)")
        return until, max(1, min(budget, self.length - 1))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self._generator is None:
            self._generator = tasks.make_generator(self.config, self.specials,
                                                   tasks.Sampling(temperature=0.0))
        plans = []
        for i, request in enumerate(requests):
            context, kwargs = request.args[0], request.args[1]
            until, budget = self._options(kwargs)
            keep = self.length - budget - 1  # + BOS: a prompt and its tokens fit a row
            ctx = self.tok_encode(context)[-keep:] if keep > 0 else []
            plans.append((budget, bucket(len(ctx) + 1), i, ctx, until))
        plans.sort(key=lambda p: p[:3])
        groups = []
        for _, same in itertools.groupby(plans, key=lambda p: p[:2]):
            same = list(same)
            groups += [same[s:s + self.rows] for s in range(0, len(same), self.rows)]
        out = [None] * len(requests)
        key = jax.random.key(0)  # greedy: the key is not used
        bar = tqdm(total=len(plans), desc=f"{NAME}: generating", disable=disable_tqdm)
        for group in groups:
            budget, length = group[0][:2]
            rows = [[p[3]] for p in group] + [[[]]] * (self.rows - len(group))  # BOS-only fill
            prompt = build_prompt(rows, self.config.model, self.specials, length=length)
            gen = self._generator(self.variables, prompt, key, max_new_tokens=budget,
                                  max_images=0, allow_images=False)
            tokens, counts = np.asarray(gen.tokens), np.asarray(gen.num_tokens)
            for r, (_, _, i, _, until) in enumerate(group):
                ids = tasks.text_ids(tokens[r, :counts[r]], self.config.model)
                out[i] = cut_at_stops(self.tok_decode(ids), until)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            bar.update(len(group))
        bar.close()
        return out


def main(argv=None) -> None:
    """lm-eval's command line with `--model transfusion_jax` (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        argv = argv[1:]
    if not any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        argv = ["--model", NAME] + argv
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval", "run"] + argv
    cli_evaluate()


if __name__ == "__main__":
    main()
