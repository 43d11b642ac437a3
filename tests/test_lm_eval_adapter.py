"""The lm-evaluation-harness adapter (evaluators/lm_eval_adapter.py) on a random-weight tiny
model: loglikelihood against one full forward per request; lm-eval's multiple-choice acc and
acc_norm through the adapter equal the ranked evaluator's on the same local task; rolling
log-likelihood against the perplexity evaluator and against one forward per window;
generate_until against greedy decoding by full forwards."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task's JSONL is local: never the hub
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional extra `lmeval` "
                              "(pip install -e '.[lmeval]'; the `test` extra has it)")
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from transfusion_jax.core.config import load_config
from transfusion_jax.data.tokenizer import get_tokenizer
from transfusion_jax.evaluators import perplexity, ranked
from transfusion_jax.evaluators.common import Context
from transfusion_jax.evaluators.lm_eval_adapter import TransfusionLM, bucket
from transfusion_jax.models import build_model, patches_per_image
from transfusion_jax.models.autoencoder.codec import IDENTITY

LENGTH = 64


def random_variables(cfg, seed=0):
    """Random weights of build_model(cfg) (shapes from its init, values drawn here: running the
    init takes 5 s to compile, 18 s unjitted): embeddings N(0, 1), norm scales 1 + N(0, 0.05),
    the rest N(0, 0.1), so that logits spread (no ties) and no layer is zero."""
    model = build_model(cfg)
    p = model.cfg
    batch = {k: jnp.zeros((1, 8), jnp.int32) for k in
             ("tokens", "segment_ids", "positions", "mask_pos", "patch_index")}
    batch["patch_positions"] = jnp.zeros((1, 1, patches_per_image(p)), jnp.int32)
    shape = (1, 1, p.latent_size, p.latent_size, p.latent_channels)
    shapes = jax.eval_shape(model.init, jax.random.key(0), batch, jnp.zeros(shape),
                            jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1 + 0.05 * rng.standard_normal(s.shape)).astype(s.dtype)
        return (rng.standard_normal(s.shape) * (1.0 if "embed'" in name else 0.1)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config, params, tokenizer, adapter, brute-force log-softmax of one row)."""
    config = load_config("experiments/transfusion.py:tiny")
    config.data.seq_len, config.data.batch_size = LENGTH, 4
    config.data.tokenizer_train_documents = 300
    tok = get_tokenizer(config.data, str(tmp_path_factory.mktemp("tok")))
    params = random_variables(config.model)
    model = build_model(config.model)
    forward = jax.jit(lambda p, b: jax.nn.log_softmax(model.apply(p, b, None, None)["logits"]))

    def logp_of(tokens):
        """log-softmax [n, V] of `tokens` alone in one row (one document from position 0)."""
        n = len(tokens)
        row = {"tokens": np.zeros((1, LENGTH), np.int32),
               "segment_ids": np.zeros((1, LENGTH), np.int32),
               "positions": np.arange(LENGTH, dtype=np.int32)[None],
               "mask_pos": np.arange(LENGTH, dtype=np.int32)[None],
               "patch_index": np.full((1, LENGTH), -1, np.int32)}
        row["tokens"][0, :n], row["segment_ids"][0, :n] = tokens, 1
        return np.asarray(forward(params, {k: jnp.asarray(v) for k, v in row.items()}))[0, :n]

    lm = TransfusionLM(config=config, variables=params, tokenizer=tok, max_gen_toks=6)
    return config, params, tok, lm, logp_of


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def summed(logp, tokens, n):
    """Summed log p of the last n of `tokens`, and whether each is the argmax."""
    at = range(len(tokens) - n, len(tokens))
    return (sum(float(logp[j - 1, tokens[j]]) for j in at),
            all(int(np.argmax(logp[j - 1])) == tokens[j] for j in at))


def test_loglikelihood_equals_one_full_forward_per_request(setup):
    _, _, tok, lm, logp_of = setup
    pairs = [("There is a small red circle", " in the top left."),
             ("Question: What colour is it? Answer: ", "blue"),  # the space moves
             ("", "A big square."),                                # BOS is the context
             ("A " * 40, "green triangle")]                        # kept: the last LENGTH
    out = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (ll, greedy) in zip(pairs, out):
        ctx, cont = ranked.encode_pair(tok, context, continuation)
        tokens = ([tok.bos_id] + ctx + cont)[-LENGTH:]
        want, want_greedy = summed(logp_of(tokens), tokens, len(cont))
        np.testing.assert_allclose(ll, want, rtol=1e-5, atol=1e-5)
        assert greedy == want_greedy
    # is_greedy: a continuation of the argmax tokens, scored from token ids.
    ctx = [tok.bos_id] + tok.encode("A small blue")
    first = int(np.argmax(logp_of(ctx)[-1]))
    second = int(np.argmax(logp_of(ctx + [first])[-1]))
    (ll, greedy), (_, not_greedy) = lm._loglikelihood_tokens(
        [(None, ctx, [first, second]), (None, ctx, [first, (second + 1) % 500 + 5])])
    assert greedy and not not_greedy
    np.testing.assert_allclose(ll, summed(logp_of(ctx + [first, second]), ctx + [first, second],
                                          2)[0], rtol=1e-5, atol=1e-5)


def questions():
    """16 questions with choices of different lengths (acc_norm differs from acc), contexts
    with and without a trailing space, and an empty one."""
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "big square", "small circle at the center"]
    out = []
    for i in range(16):
        context = (f"A {colours[i % 6]} {shapes[i % 5]}. Question: What is it? Answer:"
                   + (" " if i % 3 == 0 else "")) if i != 5 else ""
        choices = [shapes[(i + k) % 5] for k in range(3)] + [colours[(i + 2) % 6]]
        out.append({"context": context, "choices": choices, "label": i % 4})
    return out


def test_lm_eval_multiple_choice_equals_ranked(setup, tmp_path):
    config, params, tok, lm, _ = setup
    examples = questions()
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
  cache_dir: {tmp_path / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["tiny_choice"], num_fewshot=0, log_samples=True,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    theirs = results["results"]["tiny_choice"]

    ours = ranked.Evaluator(Context(config, tok, IDENTITY, str(tmp_path)), path=str(path))
    ours_result = ours.run(params, str(tmp_path))
    records = [json.loads(line) for line in
               (tmp_path / "scores.jsonl").read_text().splitlines()]
    for sample in results["samples"]["tiny_choice"]:
        lls = [float(r[0][0]) for r in sample["resps"]]
        np.testing.assert_allclose(lls, records[sample["doc_id"]]["loglikelihoods"],
                                   rtol=1e-5, atol=1e-5)
    assert theirs["acc,none"] == ours_result["acc"]
    assert theirs["acc_norm,none"] == ours_result["acc_norm"]
    assert [r["pred"] for r in records] != [r["pred_norm"] for r in records]  # both exercised


def test_rolling_equals_perplexity_and_windows(setup, tmp_path):
    config, params, tok, lm, logp_of = setup
    short = "A small red circle in the top left and a big blue square."
    long = " ".join(["There is a green triangle at the bottom right of the scene."] * 8)
    assert len(tok.encode(short)) + 2 <= LENGTH < 2 * len(tok.encode(long))
    ll_short, ll_long, ll_empty = lm.loglikelihood_rolling(
        requests("loglikelihood_rolling", [(short,), (long,), ("",)]), disable_tqdm=True)
    assert ll_empty == 0.0

    # The perplexity evaluator scores BOS text EOS in one window: its nll has the EOS term too.
    (tmp_path / "doc.txt").write_text(short + "\n")
    evaluator = perplexity.Evaluator(Context(config, tok, IDENTITY, str(tmp_path)),
                                     source="text_files", path=str(tmp_path / "doc.txt"),
                                     tokens=1)
    evaluator.run(params, str(tmp_path))
    (doc,) = [json.loads(line) for line in
              (tmp_path / "documents.jsonl").read_text().splitlines()]
    tokens = [tok.bos_id] + tok.encode(short)
    eos = float(logp_of(tokens)[-1, tok.eos_id])
    np.testing.assert_allclose(ll_short + eos, -doc["nll"], rtol=1e-5, atol=1e-5)

    # A long text: lm-eval's rolling windows (LENGTH tokens each), each in a row of its own.
    windows = get_rolling_token_windows(tok.encode(long), tok.bos_id, LENGTH - 1, 1)
    want = 0.0
    for ctx, cont in map(make_disjoint_window, windows):
        want += summed(logp_of(ctx + cont), ctx + cont, len(cont))[0]
    np.testing.assert_allclose(ll_long, want, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_generate_until_is_greedy_decoding_cut_at_stops(setup):
    _, _, tok, lm, logp_of = setup
    banned = [tok.pad_id, tok.bos_id, tok.boi_id, tok.eoi_id]  # the generator never samples these

    def greedy(context, n):
        tokens = [tok.bos_id] + tok.encode(context)
        out = []
        for _ in range(n):
            logp = logp_of(tokens + out)[-1].copy()
            logp[banned] = -np.inf
            out.append(int(np.argmax(logp)))
            if out[-1] == tok.eos_id:
                break
        return tok.decode(out)

    contexts = ["A small red", ("Question: How many shapes are there in the scene with the "
                                "big blue square? Answer:"), "A"]
    assert len({bucket(len(tok.encode(c)) + 1) for c in contexts}) == 2  # two prompt buckets
    want = [greedy(c, 6) for c in contexts]
    stop = want[1][2:4] if len(want[1]) >= 4 else "\n"
    args = [(contexts[0], {"until": ["\n\n"]}), (contexts[1], {"until": [stop]}),
            (contexts[2], {"until": "zzz", "max_gen_toks": 6})]
    got = lm.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert got[0] == want[0].split("\n\n")[0]
    assert got[1] == want[1].split(stop)[0]
    assert got[2] == want[2]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(requests("generate_until", [("A", {"do_sample": True,
                                                            "temperature": 0.7})]))


def test_bad_model_args_are_named(tmp_path):
    with pytest.raises(ValueError, match="workdir=DIR"):
        TransfusionLM()
    with pytest.raises(FileNotFoundError, match="training workdir"):
        TransfusionLM(workdir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown model_args"):
        TransfusionLM(workdir="x", pretrained="gpt2")
