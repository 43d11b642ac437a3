"""data.mixture (issue 15): weighted sources, step schedules, exact resume, realised shares in the
metrics, the two-stream pipeline as the empty mixture, config errors, and the Table 2 presets'
refusal to train on the shapes world. Generated data only (the shapes world, text files)."""
import json

import numpy as np
import pytest

from transfusion_jax.core.config import load_config
from transfusion_jax.data import mixture
from transfusion_jax.data.config import get_data_config, validate_data_config
from transfusion_jax.data.pipeline import make_pipeline
from transfusion_jax.data.shapes import text as shapes_text
from transfusion_jax.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(shapes_text.text_corpus(0, "train", 1000), 512)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two text files whose documents name their source and number: 'alpha 17 ...'."""
    folder = tmp_path_factory.mktemp("mixture")
    paths = {}
    for word in ("alpha", "beta"):
        lines = [f"{word} {i} " + "red circle " * (i % 5) for i in range(3000)]
        (folder / f"{word}.txt").write_text("\n".join(lines) + "\n")
        paths[word] = str(folder / f"{word}.txt")
    return paths


def small(**kw):
    return get_data_config(**{**dict(seq_len=256, batch_size=4, image_size=16, read_threads=1),
                              **kw})


def pipe(config, tok, **kw):
    return make_pipeline(config, patches_per_image=4, tokenizer=tok, shard_index=0,
                         shard_count=1, **kw)


def take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def three_sources(corpus, **weights):
    w = dict(dict(shapes_text=1.0, alpha=2.0, pairs=1.0), **weights)
    return [dict(name="shapes_text", text_source="shapes", weight=w["shapes_text"]),
            dict(name="alpha", text_source="text_files", text_files_path=corpus["alpha"],
                 weight=w["alpha"]),
            dict(name="pairs", image_source="shapes", weight=w["pairs"],
                 shapes_interleaved_fraction=0.2, caption_first_prob=0.5)]


# ---------------------------------------------------------------------------------- shares

def test_shares_follow_the_weights_over_10k_documents(tok, corpus):
    """Three sources (two text, one image-text) at 1:2:1 of elements: text tokens of text
    documents, patches of image documents (data/mixture.py, the weight's unit)."""
    p = pipe(small(mixture=three_sources(corpus)), tok)
    while p.metrics()["documents"] < 10_000:
        next(p)
    m = p.metrics()
    for name, target in (("shapes_text", 0.25), ("alpha", 0.5), ("pairs", 0.25)):
        assert abs(m[f"mix/{name}/share"] - target) < 0.01, (name, m[f"mix/{name}/share"])
    assert sum(m[f"mix/{n}/documents"] for n in p.mixture) == m["documents"]
    assert sum(m[f"mix/{n}/document_share"] for n in p.mixture) == pytest.approx(1.0)
    # The units: text sources count their documents' tokens, the image source its patches.
    assert m["mix/pairs/elements"] == m["image_document_patches"]
    assert m["mix/shapes_text/elements"] + m["mix/alpha/elements"] == m["text_document_tokens"]
    assert not any(k.startswith("mix_") for k in m)  # the raw slots stay out of the log


def test_weighted_mix_of_documents_stays_within_a_document_of_its_weights():
    """The mixer alone, on fake documents of 1..9 elements: greedy deficit keeps every prefix
    within one document (9 elements) of the weights; its state resumes exactly."""
    import grain
    from transfusion_jax.data import counters
    from transfusion_jax.data.mixing import WeightedMixIterDataset

    def stream(key, n):
        docs = [{"id": (key, i), "counts": counters.counts(documents=1, text_document_tokens=
                                                          1 + (i * 7 + key) % 9)}
                for i in range(n)]
        return grain.MapDataset.source(docs).to_iter_dataset()

    weights = (1.0, 3.0, 0.0, 2.0)
    mix = WeightedMixIterDataset({f"s{k}": stream(k, 3000) for k in range(4)}, weights)
    it = iter(mix)
    got = np.zeros(4)
    for n in range(2000):
        doc = next(it)
        got[doc["id"][0]] += doc["counts"][counters.INDEX["text_document_tokens"]]
        assert np.all(np.abs(got - got.sum() * np.array(weights) / 6) <= 9), n
    assert got[2] == 0
    state = it.get_state()
    rest = [next(it)["id"] for _ in range(50)]
    it.set_state(state)
    assert [next(it)["id"] for _ in range(50)] == rest
    assert counters.as_dict(doc["counts"])[f"mix_{doc['id'][0]}_documents"] == 1


def test_adding_a_source_leaves_the_others_documents_alone(tok, corpus):
    """Each source's seed stream comes from its name (data/mixture.py: stream_index): a new
    entry changes the interleaving, not the order of another source's documents."""
    def alpha_ids(entries):
        c = small(mixture=entries, pack_split_text=False)
        ids = []
        for batch in take(pipe(c, tok), 6):
            for b in range(batch["tokens"].shape[0]):
                seg = batch["segment_ids"][b]
                for s in range(1, seg.max() + 1):
                    words = tok.decode(batch["tokens"][b][seg == s]).split()
                    if words[:1] == ["alpha"]:
                        ids.append(int(words[1]))
        return ids

    two = three_sources(corpus)[:2]
    beta = dict(name="beta", text_source="text_files", text_files_path=corpus["beta"], weight=3.0)
    a, b = alpha_ids(two), alpha_ids([beta] + two)
    n = min(len(a), len(b))
    assert n >= 10 and a[:n] == b[:n]


# ---------------------------------------------------------------------------------- schedules

SCHEDULED_STEPS = 40


def scheduled(corpus):
    """alpha 1 throughout; beta 1, then 3 from step 20; shapes text 0, then 1 from step 20."""
    return small(seq_len=128, batch_size=2, mixture=[
        dict(name="alpha", text_source="text_files", text_files_path=corpus["alpha"], weight=1.0),
        dict(name="beta", text_source="text_files", text_files_path=corpus["beta"], weight=1.0,
             schedule=[[0.5, 3.0]]),
        dict(name="late", text_source="shapes", weight=0.0, schedule=[[0.5, 1.0]])])


def per_step(p, steps):
    """[{name: (elements, documents) placed in that step's batch}] for steps 1..steps."""
    out, before = [], {n: (0, 0) for n in p.mixture}
    for _ in range(steps):
        next(p)
        m = p.metrics()
        now = {n: (m[f"mix/{n}/elements"], m[f"mix/{n}/documents"]) for n in p.mixture}
        out.append({n: (now[n][0] - before[n][0], now[n][1] - before[n][1]) for n in now})
        before = now
    return out


def test_a_scheduled_weight_takes_effect_at_the_named_step(tok, corpus):
    assert mixture.switch_step(0.5, SCHEDULED_STEPS) == 20
    assert mixture.switch_step(0.99, 250_000) == 247_500  # the paper's last 1%
    steps = per_step(pipe(scheduled(corpus), tok, total_steps=SCHEDULED_STEPS), 36)
    # Exactly at step 20 (batch 19): no "late" document before it, some in its first batch.
    assert all(s["late"][1] == 0 for s in steps[:19])
    assert steps[19]["late"][1] > 0
    share = lambda window, name: (sum(s[name][0] for s in window)
                                  / sum(s[n][0] for s in window for n in s))
    before, after = steps[:19], steps[19:]
    assert abs(share(before, "beta") - 0.5) < 0.03
    for name, target in (("alpha", 0.2), ("beta", 0.6), ("late", 0.2)):
        assert abs(share(after, name) - target) < 0.03, (name, share(after, name))


def test_resume_is_exact_across_a_schedule_change(tok, corpus):
    c = scheduled(corpus)
    p = pipe(c, tok, total_steps=SCHEDULED_STEPS)
    take(p, 17)
    state, metrics = p.get_state(), p.metrics()
    expected = take(p, 5)  # steps 18..22: the switch at 20 inside
    assert json.loads(state)["layout"]["mixture"] == ["alpha", "beta", "late"]
    q = pipe(c, tok, total_steps=SCHEDULED_STEPS)
    q.set_state(state)
    assert q.metrics() == metrics
    assert same(take(q, 5), expected)
    assert q.metrics() == p.metrics()
    other = pipe(small(seq_len=128, batch_size=2, mixture=three_sources(corpus)), tok)
    with pytest.raises(ValueError, match="mixture"):
        other.set_state(state)  # another mixture's state does not fit its streams


def test_a_schedule_needs_the_runs_total_steps(tok, corpus):
    with pytest.raises(ValueError, match=r"data\.mixture\[1\]\.schedule.*total_steps"):
        pipe(scheduled(corpus), tok)


# ---------------------------------------------------------------------------------- two streams

def test_empty_mixture_is_the_two_stream_ratio_mix(tok):
    """data.mixture = [] is the two-stream pipeline (RatioMixIterDataset at
    text_to_patch_ratio), and that pipeline is the mixture [text weight r, image weight 1] on
    the two-stream seed streams (0 and 1): the weighted mixer generalises the ratio mixer."""
    c = small(text_to_patch_ratio=0.5)
    assert c.mixture == () and mixture.entries(c) == ()
    two_stream = pipe(c, tok)
    expected = take(two_stream, 6)
    entries = [dict(name="text", text_source="shapes", weight=0.5, stream=0),
               dict(name="image", image_source="shapes", weight=1.0, stream=1)]
    mixed = pipe(small(text_to_patch_ratio=0.5, mixture=entries), tok)
    assert same(take(mixed, 6), expected)
    m, r = mixed.metrics(), two_stream.metrics()
    assert m["mix/text/elements"] == r["text_document_tokens"]
    assert m["mix/image/elements"] == r["image_document_patches"]
    assert not any(k.startswith("mix") for k in r)  # a run without a mixture logs as before


# ---------------------------------------------------------------------------------- errors

TEXT = dict(name="t", text_source="shapes", weight=1.0)


@pytest.mark.parametrize("entries,message", [
    ([TEXT, dict(TEXT, name="u", weight=-1.0)], r"data\.mixture\[1\]\.weight = -1\.0"),
    ([TEXT, dict(TEXT, name="u", weight="heavy")], r"data\.mixture\[1\]\.weight = 'heavy'"),
    ([dict(TEXT, colour="red")], r"data\.mixture\[0\]\.colour: unknown field"),
    ([dict(TEXT, weight=0.0), dict(TEXT, name="u", weight=0.0)],
     r"data\.mixture\[\*\]\.weight: all zero"),
    ([dict(TEXT, schedule=[[0.5, 0.0]])], r"all zero from 0\.5 of total_steps"),
    ([dict(TEXT, schedule=[[1.5, 2.0]])], r"data\.mixture\[0\]\.schedule"),
    ([dict(TEXT, schedule=[[0.5, 2.0], [0.2, 1.0]])], r"data\.mixture\[0\]\.schedule"),
    ([dict(TEXT, seq_len=128)], r"data\.mixture\[0\]\.seq_len: a field of the whole pipeline"),
    ([dict(TEXT, image_source="shapes")], r"data\.mixture\[0\]: .*exactly one of"),
    ([dict(name="t", weight=1.0)], r"data\.mixture\[0\]: names no source"),
    ([dict(TEXT, text_source="c4")], r"data\.mixture\[0\]\.text_source = 'c4'"),
    ([TEXT, dict(name="f", text_source="text_files", weight=1.0)],
     r"data\.mixture\[1\]\.text_files_path"),
    ([dict(TEXT, shapes_num_documents="many")], r"data\.mixture\[0\]\.shapes_num_documents"),
    ([TEXT, dict(TEXT)], r"data\.mixture\[1\]\.name = 't': expected distinct names"),
    ([dict(TEXT, name="a b")], r"data\.mixture\[0\]\.name = 'a b'"),
    ([dict(TEXT, stream=0), dict(TEXT, name="u", stream=0)], r"data\.mixture\[1\]\.stream = 0"),
    (["c4"], r"data\.mixture\[0\] = 'c4': expected a dict"),
    ([dict(TEXT, name=f"s{i}") for i in range(17)], r"data\.mixture = .*at most 16"),
])
def test_bad_mixtures_name_the_field(entries, message):
    with pytest.raises(ValueError, match=message):
        get_data_config(mixture=entries)


def test_a_mixture_read_back_from_json_validates():
    """config.json holds the mixture as a list of dicts; the command line as a tuple."""
    import ml_collections
    c = get_data_config(mixture=[TEXT, dict(name="i", image_source="shapes", weight=1.0)])
    back = ml_collections.ConfigDict(json.loads(c.to_json_best_effort()))
    validate_data_config(back)
    assert mixture.names(back) == ("t", "i") and mixture.kind(back.mixture[1]) == "image"


# ---------------------------------------------------------------------------------- presets

@pytest.mark.parametrize("spec", ["experiments/transfusion.py:0.16b",
                                  "experiments/chameleon.py:7b"])
def test_paper_presets_refuse_the_shapes_world_at_start(spec):
    from transfusion_jax.trainers import transfusion as trainer
    config = load_config(spec)  # building the config (counting params, sweeps) still works
    with pytest.raises(ValueError) as error:
        trainer.check_config(config, 8)
    text = str(error.value)
    assert "data.mixture" in text and "data.tokenizer_model" in text
    assert "data.require_real_data=false" in text
    # The mixture the message (and experiments/transfusion.py) suggests is a valid override.
    paste = mixture.PAPER_MIXTURE_HINT.split("=", 1)[1].strip("'")
    config.data.mixture = json.loads(paste)
    with pytest.raises(ValueError, match="data.tokenizer_model") as error:
        trainer.check_config(config, 8)
    assert "data.mixture" not in str(error.value)
    config.data.tokenizer_model = "gs://b/tokenizer.model"
    trainer.check_config(config, 8)
    assert mixture.uses_shapes(config.data) == []


def test_small_presets_keep_the_shapes_world():
    from transfusion_jax.trainers import transfusion as trainer
    for spec in ("experiments/transfusion.py:tiny", "experiments/transfusion.py:demo",
                 "experiments/chameleon.py:tiny"):
        config = load_config(spec)
        assert config.data.require_real_data is False
        trainer.check_config(config, 8)


@pytest.mark.slow
def test_the_switch_step_holds_with_worker_processes(tok, corpus):
    """Worker i of N packs batches i, i + N, ... (mp_prefetch's interleaving): the switch
    still falls on the named step."""
    c = scheduled(corpus)
    c.worker_count = 2
    p = pipe(c, tok, total_steps=SCHEDULED_STEPS)
    steps = per_step(p, 22)
    p.close()
    assert all(s["late"][1] == 0 for s in steps[:19]) and steps[19]["late"][1] > 0


def test_host_data_sums_the_streams_shares(tok, corpus):
    """The trainer's HostData: the realised shares of all the streams it owns, and the run's
    total_steps reaching each stream's schedule."""
    from transfusion_jax.data.host_data import HostData
    host = HostData(scheduled(corpus), patches_per_image=4, tokenizer=tok, num_streams=2,
                    rows=(0, 2), total_steps=SCHEDULED_STEPS)
    for _ in range(3):
        next(host)
    m = host.metrics()
    assert m["rows"] == 6 and m["mix/late/documents"] == 0
    assert sum(m[f"mix/{n}/documents"] for n in ("alpha", "beta", "late")) == m["documents"]
    assert m["mix/alpha/share"] + m["mix/beta/share"] == pytest.approx(1.0)
    host.close()
