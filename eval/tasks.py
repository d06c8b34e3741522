"""Zero-shot multiple-choice tasks, formatted and scored as lm-evaluation-harness does.

Each example becomes one log-likelihood request (context, continuation) per choice, with
continuation = " " + choice (lm-eval's target delimiter). acc = the choice of highest
log-likelihood is the gold one; acc_norm = the same after dividing each log-likelihood by the
length of the choice's text in characters (lm-eval's acc_norm). Winogrande swaps the roles: the
choices are contexts (the sentence up to the blank, filled with each option) sharing one
continuation, and lm-eval reports acc only; so does BoolQ.

Data: the `datasets` hub (the validation split lm-eval uses), a `datasets.save_to_disk`
directory of the same, or a local file in the dataset's original release format:
    piqa           valid.jsonl (goal, sol1, sol2) + valid-labels.lst next to it
    arc_easy,      ARC-Easy-Dev.jsonl / ARC-Challenge-Dev.jsonl
    arc_challenge    ({"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"})
    hellaswag      hellaswag_val.jsonl (activity_label, ctx_a, ctx_b, endings, label)
    winogrande     dev.jsonl (sentence, option1, option2, answer; or dev-labels.lst)
    boolq          dev.jsonl (question, passage, answer: true/false)
    openbookqa     Main/dev.jsonl (ARC's layout)
    sciq           valid.json (a JSON list: question, support, distractor1..3, correct_answer)
Examples are taken in file order; --limit N keeps the first N (as lm-eval's --limit).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

from cats_jax.cli import InputError
from cats_jax.data import OFFLINE_HINT


class TaskDataError(InputError):
    """Task data that cannot be read: the message names the file or dataset and what to do."""


@dataclasses.dataclass(frozen=True)
class Example:
    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    choices: tuple[str, ...]  # the choice texts whose lengths acc_norm divides by
    gold: int


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    hub: tuple[str, str | None, str]  # `datasets` path, configuration, split
    metrics: tuple[str, ...]
    example: Callable[[dict], Example]  # one record (hub or original release schema) -> Example


def _choices(context: str, choices, gold: int) -> Example:
    choices = tuple(choices)
    return Example(tuple((context, " " + c) for c in choices), choices, int(gold))


def _arc_fields(doc: dict) -> tuple[str, list[str], list[str]]:
    """(question, choice texts, choice labels) of ARC / OpenBookQA in hub or release layout."""
    q = doc["question"] if "question" in doc else doc["question_stem"]
    if isinstance(q, dict):  # original release: {"stem": ..., "choices": [{"text", "label"}, ...]}
        return q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    return q, list(doc["choices"]["text"]), list(doc["choices"]["label"])


def arc(doc: dict) -> Example:
    question, texts, labels = _arc_fields(doc)
    return _choices(f"Question: {question}\nAnswer:", texts, labels.index(doc["answerKey"]))


def openbookqa(doc: dict) -> Example:
    question, texts, labels = _arc_fields(doc)
    return _choices(question, texts, labels.index(doc["answerKey"].lstrip()))


def piqa(doc: dict) -> Example:
    return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are WikiHow artifacts
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(doc: dict) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    return _choices(query, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def winogrande(doc: dict) -> Example:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    target = " " + sentence[blank + 1:].strip()
    contexts = tuple(sentence[:blank] + opt for opt in (doc["option1"], doc["option2"]))
    answer = doc["answer"] if doc.get("answer") not in (None, "") else doc["label"]
    return Example(tuple((c, target) for c in contexts), contexts, int(answer) - 1)


def boolq(doc: dict) -> Example:
    label = int(doc["answer"]) if "answer" in doc else int(doc["label"])  # release/google: bool; super_glue: 0/1
    return _choices(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], label)


def sciq(doc: dict) -> Example:
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _choices(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:", choices, 3)


ACC, BOTH = ("acc",), ("acc", "acc_norm")
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("piqa", ("baber/piqa", None, "validation"), BOTH, piqa),
    Task("arc_easy", ("allenai/ai2_arc", "ARC-Easy", "validation"), BOTH, arc),
    Task("arc_challenge", ("allenai/ai2_arc", "ARC-Challenge", "validation"), BOTH, arc),
    Task("hellaswag", ("Rowan/hellaswag", None, "validation"), BOTH, hellaswag),
    Task("winogrande", ("allenai/winogrande", "winogrande_xl", "validation"), ACC, winogrande),
    Task("boolq", ("aps/super_glue", "boolq", "validation"), ACC, boolq),
    Task("openbookqa", ("allenai/openbookqa", "main", "validation"), BOTH, openbookqa),
    Task("sciq", ("allenai/sciq", None, "validation"), BOTH, sciq),
]}


# ---- reading records -------------------------------------------------------------------------
def read_file(path: str | Path) -> list[dict]:
    """Records of a release-format .jsonl / .json file, or of a `datasets.save_to_disk` directory.
    A `<stem>-labels.lst` next to a .jsonl (PIQA, Winogrande) supplies each record's "label"."""
    path = Path(path)
    if path.is_dir():
        import datasets

        try:
            return list(datasets.load_from_disk(str(path)))
        except (FileNotFoundError, ValueError) as e:
            raise TaskDataError(f"{path}: not a datasets.save_to_disk directory ({e})") from e
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    if path.suffix == ".json":
        records = _json(path.read_text(encoding="utf-8"), path, "a JSON list of records")
        if not isinstance(records, list):
            raise TaskDataError(f"{path}: expected a JSON list of records")
        return records
    if path.suffix != ".jsonl":
        raise TaskDataError(f"{path}: expected a .jsonl or .json file, or a save_to_disk directory")
    with path.open(encoding="utf-8") as f:
        records = [_json(line, f"{path}:{n}", "one JSON record per line")
                   for n, line in enumerate(f, 1) if line.strip()]
    labels = path.with_name(path.stem + "-labels.lst")
    if labels.is_file():
        values = labels.read_text().split()
        if len(values) != len(records):
            raise TaskDataError(f"{labels}: {len(values)} labels for {len(records)} records in {path.name}")
        for r, v in zip(records, values):
            r.setdefault("label", int(v))
    return records


def _json(text: str, where, expected: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{where}: not valid JSON ({e}); expected {expected}, in the dataset's "
                            "original release format (eval/tasks.py lists them)") from e


def read_hub(task: Task) -> list[dict]:
    import datasets

    path, config, split = task.hub
    try:
        return list(datasets.load_dataset(path, config, split=split))
    except OSError as e:  # ConnectionError, offline mode, not found
        raise TaskDataError(
            f"{task.name}: cannot load {path} ({config or 'default'}, {split}) from the Hugging Face hub: {e}. "
            f"Without hub access pass --data-file {task.name}=FILE (the dataset's original release file); "
            f"{OFFLINE_HINT}."
        ) from e


def load_examples(name: str, data_file: str | None = None, limit: int | None = None) -> tuple[list[Example], dict]:
    """(examples, description of their source) of a task."""
    if name not in TASKS:
        raise TaskDataError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    task = TASKS[name]
    if data_file:
        records, source = read_file(data_file), {"file": str(Path(data_file).absolute())}
    else:
        records, source = read_hub(task), {"dataset": task.hub[0], "config": task.hub[1], "split": task.hub[2]}
    source["records"] = len(records)
    if limit is not None:
        records = records[:limit]
    examples = []
    for i, r in enumerate(records):
        try:
            examples.append(task.example(r))
        except (KeyError, ValueError, TypeError) as e:
            raise TaskDataError(f"{name}: record {i} of {data_file or task.hub[0]} does not fit the task's format "
                                f"({type(e).__name__}: {e}); record keys: {sorted(r)}") from e
    return examples, source
