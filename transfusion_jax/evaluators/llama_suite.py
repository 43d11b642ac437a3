"""The Llama 2 commonsense suite for the `ranked` evaluator (paper section 4.1: "average 0-shot
accuracy" on the Llama 2 suite), built as lm-evaluation-harness 0.4.13's task YAMLs build it.

Each task's documents become ranked examples exactly as lm-eval's YAML renders them
(lm_eval/tasks/<task>/*.yaml and utils.py; target_delimiter " ", zero-shot):

  hellaswag       context preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
                  choices [preprocess(e) for e in endings], label int(label)   (utils.py:
                  preprocess strips, turns " [title]" into ". ", drops "[...]", "  " -> " ")
  piqa            "Question: {goal}\\nAnswer:", [sol1, sol2], label
  social_iqa      "Q: {context} {question}\\nA:", [answerA, answerB, answerC], int(label) - 1
  winogrande      partial evaluation (lm-eval's "multiple inputs"): the choices are contexts,
                  sentence[:blank] + option1 / option2, and the one scored continuation is
                  sentence[blank + 1:].strip(); label {"1": 0, "2": 1}[answer]. Ranked example
                  {"contexts": [...], "continuation": str, "label"}; acc_norm divides by the
                  contexts' lengths, as lm-eval's completion_len does (its YAML reports acc only)
  arc_easy,       "Question: {question}\\nAnswer:", choices.text,
  arc_challenge   choices.label.index(answerKey)
  boolq           "{passage}\\nQuestion: {question}?\\nAnswer:", ["no", "yes"], label
                  (SuperGLUE's BoolQ, whose passage is "<title> -- <passage>")
  openbookqa      question_stem, choices.text, choices.label.index(answerKey.lstrip())
  commonsense_qa  "Question: {question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\n
                  E. {c4}\\nAnswer:", choices ["A", "B", "C", "D", "E"], index of answerKey

Reading them from TFDS (`tfds.data_source`, prepared beforehand; nothing downloads at run time):
tensorflow-datasets 4.9.10 has

  hellaswag 1.1.0              -> hellaswag       (features context, endings, activity_label,
                                  label, split_type, source_id; lm-eval scores "validation")
  piqa 1.0.0                   -> piqa            ("validation")
  winogrande 1.2.0             -> winogrande      (label ClassLabel ["1", "2"]; "validation" is
                                  dev.jsonl, the same for every training size, lm-eval's
                                  winogrande_xl validation)
  ai2_arc/ARC-Easy 1.0.0       -> arc_easy        ("test"; TFDS turns labels "1".."5" into
  ai2_arc/ARC-Challenge 1.0.0  -> arc_challenge    "A".."E" for choices and key alike, which
                                                   keeps the key's index)
  bool_q 1.0.0                 -> boolq           (the original BoolQ: passage without its
                                  title; lm-eval's SuperGLUE passage is rebuilt as
                                  "<title> -- <passage>"; label int(answer); "validation")
  super_glue/boolq 1.0.2       -> boolq           (passage, question, label as lm-eval reads
                                  them; tfds 4.9.10's super_glue builder imports TensorFlow)
  openbookqa 0.1.0             -> openbookqa      (built from the release's "Additional" files:
                                  question.stem, choice_A..D, answerKey ClassLabel A..D; the
                                  same 4957/500/500 questions as lm-eval's "main"; "test")
  cos_e 0.0.1                  -> commonsense_qa  (CoS-E joins CommonsenseQA v1.11: question
                                  stem, the five choices in A..E order and the answer's text;
                                  "validation" is CQA's 1221 dev questions, in CoS-E's order)

and no Social IQa (`social_i_qa`, `siqa`) and no `commonsense_qa` builder. Those (and any task)
read a local JSONL made from the Hugging Face dataset files with this module's converter:

    python -m transfusion_jax.evaluators.llama_suite --task social_iqa \\
        --input siqa/validation.parquet --output siqa_validation.jsonl

(.parquet, .jsonl or .json of records in the schema of lm-eval's dataset_path: lighteval/siqa,
tau/commonsense_qa, allenai/winogrande, Rowan/hellaswag, ...; `--labels FILE` for the original
AllenAI releases that keep labels in a separate .lst, one per line). The `ranked` evaluator reads
it with `path=`.

HellaSwag through TFDS: the TFDS record keeps only the raw `ctx` (ctx_a + " " + ctx_b, or ctx_a
when ctx_b is empty), while lm-eval capitalises ctx_b. `split_hellaswag_context` recovers
ctx_b: WikiHow records (source_id "wikihow~...") have an empty ctx_b; for ActivityNet records
ctx_b is the text after ctx's last sentence end (".", "!" or "?", closing quotes or brackets,
then a space) when that text does not start in upper case nor end a sentence itself, else
empty. A ctx_b that holds a sentence end itself ("mr. smith") would be cut short; the JSONL
converter from Rowan/hellaswag's files has ctx_a and ctx_b and needs no recovery.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Callable

import numpy as np

TASKS = ("hellaswag", "piqa", "social_iqa", "winogrande", "arc_easy", "arc_challenge", "boolq",
         "openbookqa", "commonsense_qa")
ALIASES = {"siqa": "social_iqa"}
# The split lm-eval scores: its YAML's test_split when it has one, else validation_split.
LM_EVAL_SPLIT = {"hellaswag": "validation", "piqa": "validation", "social_iqa": "validation",
                 "winogrande": "validation", "arc_easy": "test", "arc_challenge": "test",
                 "boolq": "validation", "openbookqa": "test", "commonsense_qa": "validation"}
LETTERS = "ABCDE"


# ---------------------------------------------------------------------------------------------
# lm-eval's YAMLs: a document in the Hugging Face schema of the task's dataset_path -> example.

def hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py `preprocess`."""
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"context": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
            "label": int(doc["label"])}


def _piqa(doc):
    return {"context": f"Question: {doc['goal']}\nAnswer:", "choices": [doc["sol1"], doc["sol2"]],
            "label": int(doc["label"])}


def _social_iqa(doc):
    return {"context": f"Q: {doc['context']} {doc['question']}\nA:",
            "choices": [doc["answerA"], doc["answerB"], doc["answerC"]],
            "label": int(doc["label"]) - 1}


def _winogrande(doc):
    sentence = doc["sentence"]
    if "_" not in sentence:
        raise ValueError(f"winogrande sentence {sentence[:60]!r} has no blank '_'")
    blank = sentence.index("_")
    return {"contexts": [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]],
            "continuation": sentence[blank + 1:].strip(),
            "label": {"1": 0, "2": 1}[str(doc["answer"])]}


def _arc(doc):
    return {"context": f"Question: {doc['question']}\nAnswer:",
            "choices": list(doc["choices"]["text"]),
            "label": list(doc["choices"]["label"]).index(doc["answerKey"])}


def _boolq(doc):
    return {"context": f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
            "choices": ["no", "yes"], "label": int(doc["label"])}


def _openbookqa(doc):
    return {"context": doc["question_stem"], "choices": list(doc["choices"]["text"]),
            "label": list(doc["choices"]["label"]).index(doc["answerKey"].lstrip())}


def _commonsense_qa(doc):
    text = doc["choices"]["text"]
    lines = [f"Question: {doc['question'].strip()}"]
    lines += [f"{letter}. {text[i]}" for i, letter in enumerate(LETTERS)]
    return {"context": "\n".join(lines) + "\nAnswer:", "choices": list(LETTERS),
            "label": list(LETTERS).index(doc["answerKey"])}


DOC_TO_EXAMPLE: dict[str, Callable[[dict], dict]] = {
    "hellaswag": _hellaswag, "piqa": _piqa, "social_iqa": _social_iqa,
    "winogrande": _winogrande, "arc_easy": _arc, "arc_challenge": _arc, "boolq": _boolq,
    "openbookqa": _openbookqa, "commonsense_qa": _commonsense_qa}


def task_name(task: str) -> str:
    """An lm-eval task name of the suite (aliases: siqa)."""
    name = ALIASES.get(task, task)
    if name not in DOC_TO_EXAMPLE:
        raise ValueError(f"task={task!r}: expected one of {list(TASKS)} (or {sorted(ALIASES)})")
    return name


def example(task: str, doc: dict, where: str = "") -> dict:
    """The ranked example lm-eval's YAML makes of `doc` (Hugging Face schema); a document whose
    label does not name one of its choices (a hidden test label) is an error naming `where`."""
    try:
        e = DOC_TO_EXAMPLE[task_name(task)](doc)
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise ValueError(f"{task}: {where or 'document'}: cannot build the example "
                         f"({type(err).__name__}: {err}); expected a labelled {task} record"
                         ) from None
    n = len(e.get("contexts") or e["choices"])
    if not 0 <= e["label"] < n:
        raise ValueError(f"{task}: {where or 'document'}: label {e['label']} is not one of its "
                         f"{n} choices (an unlabelled test split?)")
    return e


# ---------------------------------------------------------------------------------------------
# TFDS records -> documents in the schema lm-eval reads.

def _s(x) -> str:
    """A TFDS text value (bytes from ArrayRecord, or str) as str."""
    if isinstance(x, (bytes, np.bytes_)):
        return bytes(x).decode("utf-8")
    return str(x)


def _strs(xs) -> list[str]:
    return [_s(x) for x in xs]


def _int(x) -> int:
    return int(np.asarray(x))


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")


def split_hellaswag_context(ctx: str, source_id: str = "") -> tuple[str, str]:
    """(ctx_a, ctx_b) of a HellaSwag `ctx` (module doc: TFDS keeps only ctx)."""
    if source_id.startswith("wikihow"):
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return ctx, ""
    tail = ctx[ends[-1].end():]
    if tail and not tail[0].isupper() and not re.search(r"[.!?][\"')\]]*$", tail):
        return ctx[:ends[-1].end()].rstrip(), tail
    return ctx, ""


def _tfds_hellaswag(r):
    ctx_a, ctx_b = split_hellaswag_context(_s(r["context"]), _s(r.get("source_id", "")))
    return {"activity_label": _s(r["activity_label"]), "ctx_a": ctx_a, "ctx_b": ctx_b,
            "endings": _strs(r["endings"]), "label": str(_int(r["label"]))}


def _tfds_piqa(r):
    return {"goal": _s(r["goal"]), "sol1": _s(r["sol1"]), "sol2": _s(r["sol2"]),
            "label": _int(r["label"])}


def _tfds_winogrande(r):  # ClassLabel names ["1", "2"]
    return {"sentence": _s(r["sentence"]), "option1": _s(r["option1"]),
            "option2": _s(r["option2"]), "answer": str(_int(r["label"]) + 1)}


def _tfds_arc(r):  # ClassLabel names A..E, for the choices' labels and the key
    return {"question": _s(r["question"]),
            "choices": {"text": _strs(r["choices"]["text"]),
                        "label": [LETTERS[_int(i)] for i in r["choices"]["label"]]},
            "answerKey": LETTERS[_int(r["answerKey"])]}


def _tfds_bool_q(r):  # the original BoolQ -> SuperGLUE's passage "<title> -- <passage>"
    return {"passage": f"{_s(r['title'])} -- {_s(r['passage'])}", "question": _s(r["question"]),
            "label": int(bool(np.asarray(r["answer"])))}


def _tfds_super_glue_boolq(r):
    return {"passage": _s(r["passage"]), "question": _s(r["question"]), "label": _int(r["label"])}


def _tfds_openbookqa(r):  # ClassLabel names A..D; choices in A..D order
    q = r["question"]
    return {"question_stem": _s(q["stem"]),
            "choices": {"text": [_s(q[f"choice_{c}"]) for c in "ABCD"], "label": list("ABCD")},
            "answerKey": "ABCD"[_int(r["answerKey"])]}


def _tfds_cos_e(r):
    choices, answer = _strs(r["choices"]), _s(r["answer"])
    if answer not in choices:
        raise ValueError(f"answer {answer!r} is not one of the choices {choices}")
    return {"question": _s(r["question"]),
            "choices": {"label": list(LETTERS[:len(choices)]), "text": choices},
            "answerKey": LETTERS[choices.index(answer)]}


# TFDS name (without version) -> (lm-eval task, record -> document in lm-eval's schema).
TFDS_TASKS = {
    "hellaswag": ("hellaswag", _tfds_hellaswag),
    "piqa": ("piqa", _tfds_piqa),
    "winogrande": ("winogrande", _tfds_winogrande),
    "ai2_arc/ARC-Easy": ("arc_easy", _tfds_arc),
    "ai2_arc/ARC-Challenge": ("arc_challenge", _tfds_arc),
    "bool_q": ("boolq", _tfds_bool_q),
    "super_glue/boolq": ("boolq", _tfds_super_glue_boolq),
    "openbookqa": ("openbookqa", _tfds_openbookqa),
    "cos_e": ("commonsense_qa", _tfds_cos_e),
}
NOT_IN_TFDS = ("social_iqa", "commonsense_qa")  # (cos_e carries CommonsenseQA's questions)


def tfds_task(name: str) -> str:
    """The lm-eval task a TFDS name ("ai2_arc/ARC-Easy", "hellaswag:1.1.0") is read as."""
    base = name.split(":")[0]
    if base not in TFDS_TASKS:
        raise ValueError(f"ranked: tfds={name!r}: the Llama 2 suite in TFDS is "
                         f"{sorted(TFDS_TASKS)}; {list(NOT_IN_TFDS)} have no TFDS builder: "
                         "make a JSONL with `python -m transfusion_jax.evaluators.llama_suite` "
                         "and give it as path=")
    return TFDS_TASKS[base][0]


def open_tfds(name: str, split: str, data_dir: str = ""):
    """tfds.data_source(name, split) of a prepared data set; anything else is an error naming the
    data set and how to prepare it (nothing downloads here)."""
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text  # noqa: F401  registers hellaswag, winogrande, cos_e, ...
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # noqa: BLE001  tfds says "not prepared" in many ways
        first = (str(e).splitlines() or [""])[0][:160]
        if isinstance(e, ModuleNotFoundError) and "tensorflow" in str(e):
            raise ValueError(f"ranked: TFDS data set {name!r} needs TensorFlow installed to be "
                             f"read with tensorflow-datasets {tfds.__version__} ({first})"
                             + ("; bool_q is the same BoolQ without it"
                                if name.startswith("super_glue") else "")) from None
        where = f" --data_dir={data_dir}" if data_dir else ""
        raise ValueError(
            f"ranked: TFDS data set {name!r} (split {split!r}) is not prepared in "
            f"{data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: {first}); prepare it "
            f"first: tfds build {name} --file_format=array_record{where} (or tfds.builder("
            f"{name!r}).download_and_prepare(file_format='array_record')); nothing downloads at "
            "run time") from None


def load_tfds(name: str, split: str = "", num: int | None = None,
              data_dir: str = "") -> tuple[str, list[dict]]:
    """(lm-eval task, ranked examples) of the first `num` (None: all) records of a TFDS data set
    of the suite; `split` defaults to the split lm-eval scores."""
    task = tfds_task(name)
    split = split or LM_EVAL_SPLIT[task]
    source = open_tfds(name, split, data_dir)
    to_doc = TFDS_TASKS[name.split(":")[0]][1]
    count = len(source) if num is None else min(num, len(source))
    out = []
    for i in range(count):
        where = f"TFDS {name} {split}[{i}]"
        try:
            doc = to_doc(source[i])
        except (KeyError, ValueError, TypeError, IndexError) as err:
            raise ValueError(f"{task}: {where}: not a {name} record ({type(err).__name__}: "
                             f"{err})") from None
        out.append(example(task, doc, where))
    if not out:
        raise ValueError(f"ranked: TFDS {name} split {split!r} has no examples")
    return task, out


# ---------------------------------------------------------------------------------------------
# Converter: Hugging Face dataset files -> the ranked evaluator's JSONL.

def read_records(path: str) -> list[dict]:
    """Records of a .parquet, .jsonl or .json file (a list, or {"data": [...]})."""
    if not os.path.isfile(path):
        raise ValueError(f"--input {path!r}: no such file")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            data = json.load(f)
            return data["data"] if isinstance(data, dict) else data
        return [json.loads(line) for line in f if line.strip()]


def convert(task: str, records: list[dict], labels: list[str] | None = None,
            num: int | None = None) -> list[dict]:
    """Ranked examples of Hugging Face records (`labels`: one per record, for files that keep
    them apart, set as the record's label/answer field)."""
    task = task_name(task)
    if labels is not None:
        if len(labels) != len(records):
            raise ValueError(f"{len(labels)} labels for {len(records)} records")
        key = "answer" if task == "winogrande" else "answerKey" if task in (
            "arc_easy", "arc_challenge", "openbookqa", "commonsense_qa") else "label"
        records = [{**r, key: lab} for r, lab in zip(records, labels)]
    records = records if num is None else records[:num]
    return [example(task, r, f"record {i}") for i, r in enumerate(records)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m transfusion_jax.evaluators.llama_suite",
        description="Hugging Face files of a Llama 2 suite task -> the ranked evaluator's JSONL, "
                    "with lm-evaluation-harness's templates")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--input", required=True, help=".parquet, .jsonl or .json records")
    p.add_argument("--output", required=True, help="the JSONL to write (path= of `ranked`)")
    p.add_argument("--labels", default="", help="a file of labels, one a line (AllenAI's .lst)")
    p.add_argument("--num", type=int, default=None, help="the first N records only")
    a = p.parse_args(argv)
    labels = None
    if a.labels:
        with open(a.labels, encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
    examples = convert(a.task, read_records(a.input), labels, a.num)
    with open(a.output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
    print(f"{len(examples)} {task_name(a.task)} examples -> {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
