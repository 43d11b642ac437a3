"""The Llama 2 suite (evaluators/llama_suite.py): TFDS records, read through `tfds.data_source`
under `tfds.testing.mock_data` (offline), become the same (context, continuation) requests,
choices and gold label that lm-evaluation-harness's own task code (its installed task YAMLs,
built into ConfigurableTask with the same records in the schema of its dataset_path) makes;
the converter of Hugging Face files does the same for the tasks TFDS lacks; what the catalog
has; an unprepared data set is an error naming it and the command that prepares it.

Each TFDS record here is written as the TFDS builder's `_generate_examples` writes the raw file's
record (ClassLabel names encoded as their index, text as bytes as ArrayRecord returns it), beside
the same record as the Hugging Face dataset lm-eval reads holds it. The HellaSwag records are
real ones (ctx_a/ctx_b/ctx as HellaSwag's jsonl files hold them: the validation example of
rowanz/hellaswag's README and training examples that OLMES quotes as few-shot examples); the
BoolQ pair is the first training question as the original release (title apart) and SuperGLUE
(passage "<title> -- <passage>") hold it, its passage cut short."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval reads the records given: never the hub
import tensorflow_datasets as tfds  # noqa: E402

from transfusion_jax.core.config import load_config  # noqa: E402
from transfusion_jax.evaluators import llama_suite, ranked  # noqa: E402
from transfusion_jax.evaluators.common import Context  # noqa: E402
from transfusion_jax.models.autoencoder.codec import IDENTITY  # noqa: E402
from test_perplexity import ByteTokenizer  # noqa: E402


def b(text):
    return text.encode("utf-8")


def texts(items):
    return np.array([b(t) for t in items], dtype=object)


HELLASWAG = [  # Rowan/hellaswag schema (label a string, as there)
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
     "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val",
     "split_type": "indomain", "label": "3", "source_id": "activitynet~v_-JhWjGDPHMY",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 39, "activity_label": "Education and Communications",
     "ctx_a": "[header] How to make a liquid into a solid [title] Place a small open container "
              "of water in the freezer compartment of a class or home refrigerator. [title] "
              "Leave the water there for several hours or overnight. [title] Remove from the "
              "freezer and note what has occurred.",
     "ctx_b": "",
     "ctx": "[header] How to make a liquid into a solid [title] Place a small open container "
            "of water in the freezer compartment of a class or home refrigerator. [title] "
            "Leave the water there for several hours or overnight. [title] Remove from the "
            "freezer and note what has occurred.",
     "split": "train", "split_type": "indomain", "label": "0", "source_id": "wikihow~66",
     "endings": [
         "[step] Water changes state from liquid to solid when it reaches a temperature of 0 "
         "degrees celsius, or 32 degrees fahrenheit. This is a simple example of changing from "
         "liquid to solid, or freezing.",
         "[substeps] Check that the container is completely dry, but no ice has formed. You "
         "should get a sample before disposing of it.",
         "[step] Don't drink and continue making liquid. [title] Separate the ice water if "
         "you're not used to using water.",
         "[title] Set a timer to check on the reaction. [step] The liquid should be safe to "
         "use again once the water has frozen completely and the food appears firm."]},
    {"ind": 12, "activity_label": "Health",
     "ctx_a": "[header] How to cope with suicidal thoughts [title] Put off any plans. [step] "
              "Promise yourself that you'll wait 48 hours before doing anything. Remember, "
              "thoughts don't have the power to force you to act.",
     "ctx_b": "",
     "ctx": "[header] How to cope with suicidal thoughts [title] Put off any plans. [step] "
            "Promise yourself that you'll wait 48 hours before doing anything. Remember, "
            "thoughts don't have the power to force you to act.",
     "split": "train", "split_type": "indomain", "label": "3", "source_id": "wikihow~19",
     "endings": [
         "Even when you do, there may be a small image of the future still lurking around your "
         "brain. [substeps] For instance, don't tell yourself that you can't make it.",
         "You're doing something, and no one can force you to act. It's completely natural to "
         "feel negative thoughts before you act.",
         "Do not panic if people talk to you (even if it's about quitting smoking). Have a plan "
         "for how you're going to react to a group of people who bring on suicidal thoughts.",
         "Sometimes extreme pain can distort our perception. Waiting before taking action will "
         "give your mind time to clear."]},
    {"ind": 4, "activity_label": "Removing ice from car",
     "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman "
              "wearing winter clothes smiles.",
     "ctx_b": "then",
     "ctx": "Then, the man writes over the snow covering the window of a car, and a woman "
            "wearing winter clothes smiles. then",
     "split": "train", "split_type": "indomain", "label": "3",
     "source_id": "activitynet~v_-1IBHYS3L-Y",
     "endings": [", the man adds wax to the windshield and cuts it.",
                 ", a person board a ski lift, while two men supporting the head of the person "
                 "wearing winter clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.",
                 ", the man continues removing the snow on his car."]},
    {"ind": 38, "activity_label": "Arm wrestling",
     "ctx_a": "Two bodybuilder women are seated at a table. They are arm wrestling, vieing to "
              "win.",
     "ctx_b": "when there",
     "ctx": "Two bodybuilder women are seated at a table. They are arm wrestling, vieing to "
            "win. when there",
     "split": "train", "split_type": "indomain", "label": "2",
     "source_id": "activitynet~v_-QuFk_ThRNg",
     "endings": ["'s another wrestler, they finish wrestling him.",
                 "is a winner they go cheer each other on.",
                 "is a victor, the two women shake hands.",
                 "is not a winner, they get a huge kick in the face and continue wrestling as "
                 "the crowd cheers on."]},
]


def hellaswag_pair(doc):
    """Rowan/hellaswag record -> TFDS hellaswag's (its builder: 'context': elem['ctx'])."""
    return doc, {"context": b(doc["ctx"]), "endings": texts(doc["endings"]),
                 "activity_label": b(doc["activity_label"]),
                 "label": np.int32(int(doc["label"])), "split_type": b(doc["split_type"]),
                 "source_id": b(doc["source_id"])}


PIQA = [{"goal": "When boiling butter, when it's ready, you can",
         "sol1": "Pour it onto a plate", "sol2": "Pour it into a jar", "label": 1},
        {"goal": "To clean a keyboard,", "sol1": "turn it over and shake it gently.",
         "sol2": "pour water on it.", "label": 0}]

WINOGRANDE = [  # allenai/winogrande: answer "1" / "2"
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "1"},
    {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too small.",
     "option1": "trophy", "option2": "suitcase", "answer": "2"}]

ARC = [  # allenai/ai2_arc: labels as the raw files have them ("1".."4" on some questions)
    {"id": "Mercury_1", "question": "Which tool is used to measure the mass of a rock?",
     "choices": {"text": ["a ruler", "a balance", "a thermometer", "a graduated cylinder"],
                 "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
    {"id": "Mercury_2", "question": "Which of these is a renewable resource?",
     "choices": {"text": ["coal", "oil", "natural gas", "uranium", "wind"],
                 "label": ["A", "B", "C", "D", "E"]}, "answerKey": "E"}]


def arc_pair(doc):
    """ai2_arc record -> TFDS ai2_arc's ("1".."5" -> "A".."E", then ClassLabel indices)."""
    n_to_l = dict(zip("12345", "ABCDE"))
    index = lambda label: "ABCDE".index(n_to_l.get(label, label))  # noqa: E731
    return doc, {"id": b(doc["id"]), "question": b(doc["question"]),
                 "choices": {"text": texts(doc["choices"]["text"]),
                             "label": np.array([index(x) for x in doc["choices"]["label"]])},
                 "answerKey": np.int64(index(doc["answerKey"]))}


BOOLQ_SUPERGLUE = {"question": "do iran and afghanistan speak the same language",
                   "passage": "Persian language -- Persian (/\u02c8p\u025c\u02d0r\u0292\u0259n, "
                              "-\u0283\u0259n/), also known by its endonym Farsi, is one of the "
                              "Western Iranian languages.",
                   "idx": 0, "label": 1}
BOOLQ_ORIGINAL = {"question": b("do iran and afghanistan speak the same language"),
                  "title": b("Persian language"),
                  "passage": b("Persian (/\u02c8p\u025c\u02d0r\u0292\u0259n, -\u0283\u0259n/), "
                               "also known by its endonym Farsi, is one of the Western Iranian "
                               "languages."),
                  "answer": np.bool_(True)}
BOOLQ_NO = ({"question": "is the moon made of cheese", "passage": "Moon -- The Moon is rock.",
             "idx": 1, "label": 0},
            {"question": b("is the moon made of cheese"), "title": b("Moon"),
             "passage": b("The Moon is rock."), "answer": np.bool_(False)})

OPENBOOKQA = [  # allenai/openbookqa "main"
    {"id": "7-980", "question_stem": "The sun is responsible for",
     "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                          "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
    {"id": "7-584", "question_stem": "When food is reduced in the stomach",
     "choices": {"text": ["the mind needs time to digest", "take a second to digest what I said",
                          "nutrients are being deconstructed", "reader's digest is a body of "
                          "works"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"}]


def openbookqa_pair(doc):
    """openbookqa "main" record -> TFDS openbookqa's (the "Additional" files' fields)."""
    text = doc["choices"]["text"]
    return doc, {"question": {"stem": b(doc["question_stem"]),
                              **{f"choice_{c}": b(t) for c, t in zip("ABCD", text)}},
                 "fact1": b("the sun is the source of energy for physical cycles on Earth"),
                 "humanScore": np.float32(1.0), "clarity": np.float32(2.0),
                 "turkIdAnonymized": b("b356d338b7"),
                 "answerKey": np.int64("ABCD".index(doc["answerKey"]))}


COMMONSENSE_QA = [  # tau/commonsense_qa
    {"id": "075e483d21c29a511267ef62bedc0461",
     "question": "The sanctions against the school were a punishing blow, and they seemed to "
                 "what the efforts the school had made to change?",
     "question_concept": "punishing",
     "choices": {"label": ["A", "B", "C", "D", "E"],
                 "text": ["ignore", "enforce", "authoritarian", "yell at", "avoid"]},
     "answerKey": "A"},
    {"id": "61fe6e879ff18686d7552425a36344c8", "question": " Where would you find a fox? ",
     "question_concept": "fox",
     "choices": {"label": ["A", "B", "C", "D", "E"],
                 "text": ["hen house", "storybook", "zoo", "forest", "mountains"]},
     "answerKey": "D"}]


def cos_e_pair(doc):
    """tau/commonsense_qa record -> TFDS cos_e's (question stem, choices, the answer's text)."""
    text = doc["choices"]["text"]
    return doc, {"id": b(doc["id"]), "question": b(doc["question"]), "choices": texts(text),
                 "answer": b(text[doc["choices"]["label"].index(doc["answerKey"])]),
                 "abstractive_explanation": b("because"), "extractive_explanation": b("so")}


SOCIAL_IQA = [  # lighteval/siqa (label "1".."3")
    {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
     "question": "What does Tracy need to do before this?", "answerA": "make a new plan",
     "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"},
    {"context": "Sydney walked past a homeless woman asking for change but did not have any "
                "money they could give to her.", "question": "How would you describe Sydney?",
     "answerA": "sympathetic", "answerB": "like a person who was unable to help",
     "answerC": "incredulous", "label": "1"}]

# TFDS name -> (lm-eval task, [(record in lm-eval's dataset schema, TFDS record)]).
CASES = {
    "hellaswag": ("hellaswag", [hellaswag_pair(d) for d in HELLASWAG]),
    "piqa": ("piqa", [(d, {"id": b(f"piqa-{i}"), "goal": b(d["goal"]), "sol1": b(d["sol1"]),
                           "sol2": b(d["sol2"]), "label": np.int64(d["label"])})
                      for i, d in enumerate(PIQA)]),
    "winogrande": ("winogrande", [(d, {"sentence": b(d["sentence"]), "option1": b(d["option1"]),
                                       "option2": b(d["option2"]),
                                       "label": np.int64(["1", "2"].index(d["answer"]))})
                                  for d in WINOGRANDE]),
    "ai2_arc/ARC-Easy": ("arc_easy", [arc_pair(d) for d in ARC]),
    "ai2_arc/ARC-Challenge": ("arc_challenge", [arc_pair(d) for d in ARC[::-1]]),
    "bool_q": ("boolq", [(BOOLQ_SUPERGLUE, BOOLQ_ORIGINAL), BOOLQ_NO]),
    "openbookqa": ("openbookqa", [openbookqa_pair(d) for d in OPENBOOKQA]),
    "cos_e": ("commonsense_qa", [cos_e_pair(d) for d in COMMONSENSE_QA]),
}


@pytest.fixture(scope="module")
def lm_eval_tasks():
    """lm-eval's TaskManager over the installed YAMLs of the suite's tasks (offline)."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional extra `lmeval`")
    from lm_eval.tasks import TaskManager
    root = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    folders = ("hellaswag", "piqa", "siqa", "winogrande", "arc", "openbookqa", "commonsense_qa",
               "super_glue/boolq")
    return TaskManager(include_path=[os.path.join(root, f) for f in folders],
                       include_defaults=False)


def lm_eval_view(manager, task, docs):
    """[(requests [(context, continuation)], doc_to_choice, gold index)] of lm-eval's own
    ConfigurableTask for `task` (its YAML, process_docs included) on `docs`, zero-shot; gold is
    the choice whose one-hot log-likelihoods process_results scores acc 1."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    def dataset(**_):
        split = datasets.Dataset.from_list([dict(d) for d in docs])
        return datasets.DatasetDict({"train": split, "validation": split, "test": split})

    entry = manager.task_index[task]
    config = manager._factory._load_full_config(entry, {"custom_dataset": dataset})
    lm_task = ConfigurableTask(config=config)
    out = []
    for i, doc in enumerate(lm_task.eval_docs):
        context = lm_task.fewshot_context(doc, 0)
        reqs = [r.arguments for r in lm_task.construct_requests(doc, context,
                                                                metadata=(task, i, 1))]
        golds = [j for j in range(len(reqs)) if lm_task.process_results(
            doc, [(0.0 if k == j else -1.0, False) for k in range(len(reqs))])["acc"] == 1.0]
        assert len(golds) == 1
        out.append((reqs, lm_task.doc_to_choice(doc), golds[0]))
    return out


def ours_view(examples):
    return [(ranked.requests(e), ranked.choice_texts(e), e["label"]) for e in examples]


def fake_source(name, split, records):
    """tfds.testing.mock_data's as_data_source_fn serving `records` for (name, split) only."""
    def as_data_source(builder, split=None, decoders=None, deserialize_method=None, **_):
        asked = builder.name + (f"/{builder.builder_config.name}"
                                if builder.builder_config else "")
        assert (asked, split) == (name, split_wanted), (asked, split)
        return records

    split_wanted = split
    return as_data_source


@pytest.mark.parametrize("name", sorted(CASES))
def test_tfds_records_become_what_lm_eval_makes_of_them(name, lm_eval_tasks):
    task, pairs = CASES[name]
    docs, records = [p[0] for p in pairs], [p[1] for p in pairs]
    split = llama_suite.LM_EVAL_SPLIT[task]
    with tfds.testing.mock_data(as_data_source_fn=fake_source(name, split, records)):
        got_task, examples = llama_suite.load_tfds(name)
    assert got_task == task and len(examples) == len(records)
    theirs = lm_eval_view(lm_eval_tasks, task, docs)
    assert ours_view(examples) == theirs
    if task == "hellaswag":  # ctx_a / ctx_b recovered from ctx alone, as the real ones were
        for doc in docs:
            assert llama_suite.split_hellaswag_context(doc["ctx"], doc["source_id"]) == (
                doc["ctx_a"], doc["ctx_b"])
    with tfds.testing.mock_data(as_data_source_fn=fake_source(name, split, records)):
        assert llama_suite.load_tfds(name, num=1)[1] == examples[:1]


def test_hellaswag_context_split_rules():
    split = llama_suite.split_hellaswag_context
    assert split("A dog runs! the dog", "activitynet~x") == ("A dog runs!", "the dog")
    assert split('He asks "why?" she', "activitynet~x") == ('He asks "why?"', "she")
    assert split("A man stands. He waves.", "activitynet~x") == ("A man stands. He waves.", "")
    assert split("[title] Step one. then", "wikihow~1") == ("[title] Step one. then", "")
    assert split("no sentence end here", "") == ("no sentence end here", "")


def test_winogrande_is_partial_evaluation():
    (e,) = [llama_suite.example("winogrande", WINOGRANDE[0])]
    assert e == {"contexts": ["Sarah was a much better surgeon than Maria so Sarah",
                              "Sarah was a much better surgeon than Maria so Maria"],
                 "continuation": "always got the harder cases.", "label": 0}
    assert ranked.requests(e) == [(c, " always got the harder cases.") for c in e["contexts"]]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "json"])
def test_converter_for_tasks_tfds_lacks(tmp_path, fmt, lm_eval_tasks):
    """Social IQa and CommonsenseQA from Hugging Face files -> the JSONL the ranked evaluator
    reads, equal to lm-eval's requests on the same records."""
    for task, docs in (("social_iqa", SOCIAL_IQA), ("commonsense_qa", COMMONSENSE_QA)):
        source = tmp_path / f"{task}.{fmt}"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(docs), source)
        elif fmt == "json":
            source.write_text(json.dumps(docs))
        else:
            source.write_text("".join(json.dumps(d) + "\n" for d in docs))
        out = tmp_path / f"{task}.ranked.jsonl"
        llama_suite.main(["--task", "siqa" if task == "social_iqa" else task,
                          "--input", str(source), "--output", str(out)])
        examples = ranked.read_jsonl(str(out))
        assert ours_view(examples) == lm_eval_view(lm_eval_tasks, task, docs)


def test_converter_labels_file_and_num(tmp_path):
    """AllenAI's releases keep labels apart (dev.jsonl + dev-labels.lst)."""
    (tmp_path / "dev.jsonl").write_text("".join(
        json.dumps({k: v for k, v in d.items() if k != "label"}) + "\n" for d in SOCIAL_IQA))
    (tmp_path / "dev-labels.lst").write_text("3\n1\n")
    out = tmp_path / "siqa.jsonl"
    llama_suite.main(["--task", "social_iqa", "--input", str(tmp_path / "dev.jsonl"),
                      "--labels", str(tmp_path / "dev-labels.lst"), "--output", str(out),
                      "--num", "1"])
    (e,) = ranked.read_jsonl(str(out))
    assert e == {"context": "Q: Tracy didn't go home that evening and resisted Riley's attacks. "
                            "What does Tracy need to do before this?\nA:",
                 "choices": ["make a new plan", "Go home and see Riley", "Find somewhere to go"],
                 "label": 2}
    with pytest.raises(ValueError, match="record 0: cannot build the example"):
        llama_suite.convert("hellaswag", [dict(HELLASWAG[0], label="")])  # a hidden test label
    with pytest.raises(ValueError, match="task='mmlu': expected one of"):
        llama_suite.convert("mmlu", [])


def test_catalog_of_tensorflow_datasets(tmp_path):
    """Which tasks tensorflow-datasets 4.9.10 has (name, version, the fields read), which not."""
    import tensorflow_datasets.text  # noqa: F401
    fields = {"hellaswag": ("1.1.0", {"context", "endings", "activity_label", "label",
                                      "source_id"}),
              "piqa": ("1.0.0", {"goal", "sol1", "sol2", "label"}),
              "winogrande": ("1.2.0", {"sentence", "option1", "option2", "label"}),
              "ai2_arc/ARC-Easy": ("1.0.0", {"question", "choices", "answerKey"}),
              "ai2_arc/ARC-Challenge": ("1.0.0", {"question", "choices", "answerKey"}),
              "bool_q": ("1.0.0", {"question", "passage", "title", "answer"}),
              "openbookqa": ("0.1.0", {"question", "answerKey"}),
              "cos_e": ("0.0.1", {"question", "choices", "answer"})}
    assert set(fields) | {"super_glue/boolq"} == set(llama_suite.TFDS_TASKS)
    for name, (version, keys) in fields.items():
        builder = tfds.builder(name, data_dir=str(tmp_path))
        assert str(builder.info.version) == version
        assert keys <= set(builder.info.features.keys()), name
    assert tfds.builder("winogrande", data_dir=str(tmp_path)).info.features[
        "label"].names == ["1", "2"]
    assert tfds.builder("ai2_arc/ARC-Easy", data_dir=str(tmp_path)).info.features[
        "answerKey"].names == list("ABCDE")
    for name in ("social_i_qa", "siqa", "social_iqa", "commonsense_qa", "boolq"):
        with pytest.raises(tfds.core.registered.DatasetNotFoundError):
            tfds.builder_cls(name)


def test_random_mock_records_and_bad_records_are_named():
    with tfds.testing.mock_data(num_examples=5):
        task, examples = llama_suite.load_tfds("piqa", num=3)
        assert task == "piqa" and len(examples) == 3
        assert all(e["context"].startswith("Question: ") and e["context"].endswith("\nAnswer:")
                   and len(e["choices"]) == 2 for e in examples)
        assert len(llama_suite.load_tfds("bool_q")[1]) == 5
        with pytest.raises(ValueError, match=r"TFDS winogrande validation\[0\].*no blank"):
            llama_suite.load_tfds("winogrande")  # random sentences have no "_"


def test_unprepared_or_unknown_data_set_is_named_before_work(tmp_path):
    config = load_config("experiments/transfusion.py:tiny")
    context = Context(config, ByteTokenizer(), IDENTITY, str(tmp_path))
    with pytest.raises(ValueError, match=r"TFDS data set 'ai2_arc/ARC-Easy' \(split 'test'\) is "
                       r"not prepared in .*tfds build ai2_arc/ARC-Easy --file_format="
                       rf"array_record --data_dir={tmp_path}"):
        ranked.Evaluator(context, tfds="ai2_arc/ARC-Easy", data_dir=str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing downloaded or written
    with pytest.raises(ValueError, match=r"tfds='siqa'.*have no TFDS builder.*llama_suite"):
        ranked.Evaluator(context, tfds="siqa")
    with pytest.raises(ValueError, match="give one of them"):
        ranked.Evaluator(context, tfds="piqa", path="x.jsonl")


def test_ranked_evaluator_reads_tfds_and_scores(tmp_path):
    """The evaluator on TFDS winogrande (contexts) and piqa: one scored pair per request."""
    config = load_config("experiments/transfusion.py:tiny")
    context = Context(config, ByteTokenizer(), IDENTITY, str(tmp_path))
    _, pairs = CASES["winogrande"]
    with tfds.testing.mock_data(as_data_source_fn=fake_source(
            "winogrande", "validation", [p[1] for p in pairs])):
        evaluator = ranked.Evaluator(context, tfds="winogrande", num=2)
    assert evaluator.task == "winogrande" and len(evaluator.docs) == 4
    tok = ByteTokenizer()
    for k, (i, j) in enumerate(evaluator.pairs):
        e = evaluator.examples[i]
        assert evaluator.scored[k] == len(tok.encode(" " + e["continuation"]))
        assert list(evaluator.docs[k]["tokens"]) == [tok.bos_id] + tok.encode(
            e["contexts"][j] + " " + e["continuation"])
