"""Evaluate MOELoRA adapters per task: greedy generation, answer parsing, metrics, tables.

Generated text is parsed into the structured answer of its task type, the way the PromptCBLUE
benchmark (Zhu et al., github.com/michael-wzhu/PromptCBLUE, `src/evaluation`) post-processes
model output, and scored per task:

    extraction (ner, spo_generation, normalization, event_extraction, attr_cls)
        micro precision / recall / F1 over the set of structured items of each record
    cls, matching
        accuracy and macro-F1 over the task's labels; an answer outside the record's choices
        is wrong
    response_generation, report_generation
        ROUGE-1 / ROUGE-2 / ROUGE-L F1 (rouge-score package) on text where every Chinese
        character is one token and Latin words stay whole; reports are scored per section

Each task has one primary score (macro-F1 for CHIP-CTC, KUAKE-QIC and IMCS-V2-DAC, ROUGE-L for
MedDG and IMCS-V2-MRG, micro-F1 for the rest, as PromptCBLUE ranks them; the `metric` field of
the task registry for other tasks), and the table reports their average.

    python evaluate.py --data data/ --adapter runs/moelora                 # one adapter
    python evaluate.py --data data/ --compare none runs/moelora runs/lora  # side by side
    python evaluate.py --data data/ --predictions out/predictions.jsonl    # rescore, no model
"""

import argparse
import json
import logging
import math
import os
import re
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("evaluate")

# -----------------------------------------------------------------------------
# answer formats

# Task types whose answer is a set of structured items, scored by micro-F1.
EXTRACTION_TYPES = (
    "ner",
    "spo_generation",
    "normalization",
    "event_extraction",
    "attr_cls",
)
LABEL_TYPES = ("cls", "matching")
GENERATION_TYPES = ("response_generation", "report_generation")
TASK_TYPES = EXTRACTION_TYPES + LABEL_TYPES + GENERATION_TYPES

# The PromptCBLUE target templates, per task type. `{name}` marks a slot; list slots hold items
# joined by `separator`. A format set for other data (the demo set) has the same keys.
PROMPTCBLUE_ANSWER_FORMATS = {
    # "上述句子中的实体包含：\n药物实体：排钾利尿剂，DHCT\n临床表现实体：" (one line per type)
    "ner": {"line": "{type}实体：{entities}", "separator": "，"},
    # "具有药物治疗关系的头尾实体对如下：头实体为心力衰竭，尾实体为伊伐布雷。"
    "spo_generation": {
        "line": "具有{predicate}关系的头尾实体对如下：{pairs}",
        "pair": "头实体为{subject}，尾实体为{object}",
        "pair_separator": "。",
    },
    # "管状腺瘤，十二指肠交界性肿瘤"; only terms among the record's answer choices count.
    "normalization": {"separator": "，"},
    # "主体词：疼痛；发生状态：否定；描述词：胀痛，持续性；解剖部位：腹" (one line per event)
    "event_extraction": {
        "fields": ["主体词", "发生状态", "描述词", "解剖部位"],
        "list_fields": ["描述词", "解剖部位"],
        "key_separator": "：",
        "field_separator": "；",
        "separator": "，",
    },
    # "腹泻：已有症状疾病或者假设未来可能发生的疾病等" (one line per entity)
    "attr_cls": {"key_separator": "："},
    # "非上述类型" is a valid answer of every PromptCBLUE classification task.
    "cls": {"none_label": "非上述类型"},
    "matching": {"none_label": "非上述类型"},
    # "主诉：便秘\n现病史：便秘\n辅助检查：\n..." (one line per section)
    "report_generation": {
        "sections": ["主诉", "现病史", "辅助检查", "既往史", "诊断", "建议"],
        "key_separator": "：",
    },
    "response_generation": {},
}

# PromptCBLUE scores these tasks by macro-F1 and these by ROUGE-L; every other task by micro-F1.
PROMPTCBLUE_MACRO_F1_TASKS = ("CHIP-CTC", "KUAKE-QIC", "IMCS-V2-DAC")
PROMPTCBLUE_ROUGE_L_TASKS = ("MedDG", "IMCS-V2-MRG")

# Primary metric names as they appear in results.json and in the `metric` registry field.
METRIC_NAMES = ("micro_f1", "macro_f1", "accuracy", "rouge_l")


def _template_regex(template: str) -> re.Pattern:
    """Compile a `{slot}` template into a regex with one lazy named group per slot."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = ""
    for i, part in enumerate(parts):
        if i % 2 == 0:
            pattern += re.escape(part)
        else:
            # The last slot takes the rest of the line, the others as little as they can.
            pattern += f"(?P<{part}>.*)" if i == len(parts) - 2 else f"(?P<{part}>.*?)"
    return re.compile(pattern + "$", re.DOTALL)


def _split_items(text: str, separator: str) -> list[str]:
    return [item.strip() for item in text.split(separator) if item.strip()]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def parse_ner(text: str, answer_choices: list[str] | None, fmt: dict) -> list[dict]:
    """Parse one line per entity type into {"entity", "type"} items.

    Types outside the record's answer choices are ignored, as PromptCBLUE does, so a
    prompt's type list decides which lines count.
    """
    line_regex = _template_regex(fmt["line"])
    entities = []
    for line in _lines(text):
        match = line_regex.match(line)
        if match is None:
            continue
        entity_type = match["type"].strip()
        if answer_choices and entity_type not in answer_choices:
            continue
        for entity in _split_items(match["entities"], fmt["separator"]):
            entities.append({"entity": entity, "type": entity_type})
    return entities


def parse_spo(text: str, answer_choices: list[str] | None, fmt: dict) -> list[dict]:
    """Parse one line per predicate into {"predicate", "subject", "object"} triples."""
    line_regex = _template_regex(fmt["line"])
    pair_regex = _template_regex(fmt["pair"])
    triples = []
    for line in _lines(text):
        match = line_regex.match(line)
        if match is None:
            continue
        predicate = match["predicate"].strip()
        for pair_text in _split_items(match["pairs"], fmt["pair_separator"]):
            pair = pair_regex.match(pair_text)
            if pair is None:
                continue
            subject, obj = pair["subject"].strip(), pair["object"].strip()
            triples.append({"predicate": predicate, "subject": subject, "object": obj})
    return triples


def parse_normalization(
    text: str, answer_choices: list[str] | None, fmt: dict
) -> list[dict]:
    """Parse the standard terms on the last line; only terms among the answer choices count.

    Without answer choices every term counts except a line that is the format's `none` phrase.
    """
    lines = _lines(text)
    if not lines:
        return []
    terms = _split_items(lines[-1], fmt["separator"])
    if answer_choices:
        terms = [term for term in terms if term in answer_choices]
    elif fmt.get("none") and lines[-1] == fmt["none"]:
        terms = []
    return [{"entity": term, "type": "normalization"} for term in dict.fromkeys(terms)]


def parse_events(text: str, answer_choices: list[str] | None, fmt: dict) -> list[dict]:
    """Parse one line per event into a dict of every field; list fields hold several values.

    A line with none of the fields (the header, a blank line) is not an event.
    """
    fields, list_fields = fmt["fields"], set(fmt["list_fields"])
    prefixes = [f"{name}{fmt['key_separator']}" for name in fields]
    events = []
    for line in _lines(text):
        event = {}
        for part in line.split(fmt["field_separator"]):
            part = part.strip()
            for name, prefix in zip(fields, prefixes):
                if part.startswith(prefix) and name not in event:
                    value = part[len(prefix) :].strip()
                    event[name] = (
                        _split_items(value, fmt["separator"])
                        if name in list_fields
                        else value
                    )
                    break
        if not event:
            continue
        for name in fields:
            event.setdefault(name, [] if name in list_fields else "")
        events.append(event)
    return events


def parse_attributes(
    text: str, answer_choices: list[str] | None, fmt: dict
) -> list[dict]:
    """Parse "entity: attribute" lines into {"entity", "attr"} pairs.

    The split is at the last key separator, so entity names may contain it; lines with an
    empty entity or attribute (such as a header ending in the separator) are skipped.
    """
    pairs = []
    for line in _lines(text):
        entity, separator, attribute = line.rpartition(fmt["key_separator"])
        if not separator or not entity.strip() or not attribute.strip():
            continue
        pairs.append({"entity": entity.strip(), "attr": attribute.strip()})
    return pairs


def parse_label(text: str, answer_choices: list[str] | None, fmt: dict) -> str:
    """Return the answer label: the first line of the text, stripped."""
    lines = _lines(text)
    return lines[0] if lines else ""


def parse_report(
    text: str, answer_choices: list[str] | None, fmt: dict
) -> dict[str, str]:
    """Parse "section: text" lines into a dict; the first line for a section wins.

    Sections the text lacks are absent from the dict and score as empty text.
    """
    report = {}
    for line in _lines(text):
        for section in fmt["sections"]:
            prefix = f"{section}{fmt['key_separator']}"
            if line.startswith(prefix) and section not in report:
                report[section] = line[len(prefix) :].strip()
                break
    return report


def parse_response(text: str, answer_choices: list[str] | None, fmt: dict) -> str:
    """Return the response text, stripped."""
    return text.strip()


PARSERS = {
    "ner": parse_ner,
    "spo_generation": parse_spo,
    "normalization": parse_normalization,
    "event_extraction": parse_events,
    "attr_cls": parse_attributes,
    "cls": parse_label,
    "matching": parse_label,
    "report_generation": parse_report,
    "response_generation": parse_response,
}


def parse_answer(text: str, task_type: str, answer_choices=None, formats=None):
    """Parse generated (or gold) text into the structured answer of `task_type`.

    formats maps task types to answer formats; None means the PromptCBLUE formats.
    """
    if task_type not in PARSERS:
        raise ValueError(
            f"unknown task type {task_type!r}; expected one of {TASK_TYPES}"
        )
    formats = PROMPTCBLUE_ANSWER_FORMATS if formats is None else formats
    return PARSERS[task_type](text, answer_choices, formats.get(task_type, {}))


# -----------------------------------------------------------------------------
# metrics

# Chinese characters, one token each: CJK ideographs, extensions A-F and compatibility blocks.
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_TOKEN_REGEX = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+|[^\w\s]|_")


class CharWordTokenizer:
    """Tokenizer for `rouge_score.RougeScorer`: one token per Chinese character or punctuation
    mark, whole lowercase words for Latin text and digits.

    The package's default tokenizer keeps only [a-z0-9] and so drops all Chinese text.
    """

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN_REGEX.findall(text.lower())


def _item_key(item):
    """Hashable form of a structured item; list values are compared as sets."""
    if isinstance(item, dict):
        return tuple(sorted((key, _item_key(value)) for key, value in item.items()))
    if isinstance(item, list):
        return tuple(sorted({_item_key(value) for value in item}, key=repr))
    return item


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def extraction_scores(
    golds: list[list], predictions: list[list | None]
) -> dict[str, float]:
    """Micro precision, recall and F1 over the item sets of all records.

    A missing prediction (None) is an empty one. When gold and prediction are empty in every
    record there is nothing to get wrong, and all three scores are 1.0.
    """
    true_positives = false_positives = false_negatives = 0
    for gold, prediction in zip(golds, predictions, strict=True):
        gold_items = {_item_key(item) for item in gold}
        predicted_items = {_item_key(item) for item in prediction or []}
        true_positives += len(gold_items & predicted_items)
        false_positives += len(predicted_items - gold_items)
        false_negatives += len(gold_items - predicted_items)
    if true_positives + false_positives + false_negatives == 0:
        return {"precision": 1.0, "recall": 1.0, "micro_f1": 1.0}
    precision = (
        true_positives / (true_positives + false_positives) if true_positives else 0.0
    )
    recall = (
        true_positives / (true_positives + false_negatives) if true_positives else 0.0
    )
    return {
        "precision": precision,
        "recall": recall,
        "micro_f1": _f1(precision, recall),
    }


def valid_label(label: str | None, answer_choices: list[str] | None, fmt: dict) -> bool:
    """Whether `label` is one of the record's answer choices or the format's none label."""
    if not label:
        return False
    if label == fmt.get("none_label"):
        return True
    return answer_choices is None or label in answer_choices


def classification_scores(
    golds: list[str], predictions: list[str | None], valid: list[bool]
) -> dict[str, float]:
    """Accuracy and macro-F1 over the labels that occur in the gold or the valid predictions.

    An invalid prediction (outside the record's choices, empty or missing) is wrong: it is a
    false negative of the gold label and a false positive of no label.
    """
    if not golds:
        return {"accuracy": 0.0, "micro_f1": 0.0, "macro_f1": 0.0}
    correct = 0
    true_positives, false_positives, false_negatives = Counter(), Counter(), Counter()
    for gold, prediction, is_valid in zip(golds, predictions, valid, strict=True):
        if is_valid and prediction == gold:
            correct += 1
            true_positives[gold] += 1
            continue
        false_negatives[gold] += 1
        if is_valid:
            false_positives[prediction] += 1

    labels = set(golds) | set(false_positives)
    f1_per_label = []
    for label in sorted(labels):
        tp, fp, fn = (
            true_positives[label],
            false_positives[label],
            false_negatives[label],
        )
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1_per_label.append(_f1(precision, recall))

    # With one label per record and invalid answers counted as one more (wrong) class,
    # micro-F1 equals accuracy; PromptCBLUE ranks its two-class and matching tasks by it.
    accuracy = correct / len(golds)
    macro_f1 = sum(f1_per_label) / len(labels)
    return {"accuracy": accuracy, "micro_f1": accuracy, "macro_f1": macro_f1}


_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(_ROUGE_TYPES), tokenizer=CharWordTokenizer())


def rouge_pair_scores(scorer, gold: str, prediction: str | None) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one text pair; two empty texts match exactly, a missing one scores 0."""
    if prediction is None:
        return {name: 0.0 for name in _ROUGE_TYPES}
    if not CharWordTokenizer().tokenize(gold) and not CharWordTokenizer().tokenize(
        prediction
    ):
        return {name: 1.0 for name in _ROUGE_TYPES}
    scores = scorer.score(gold, prediction)
    return {name: scores[name].fmeasure for name in _ROUGE_TYPES}


def rouge_scores(golds: list[str], predictions: list[str | None]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over text pairs."""
    scorer = _rouge_scorer()
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for gold, prediction in zip(golds, predictions, strict=True):
        for name, value in rouge_pair_scores(scorer, gold, prediction).items():
            totals[name] += value
    count = max(len(golds), 1)
    return {
        "rouge_1": totals["rouge1"] / count,
        "rouge_2": totals["rouge2"] / count,
        "rouge_l": totals["rougeL"] / count,
    }


def report_rouge_scores(
    golds: list[dict], predictions: list[dict | None]
) -> dict[str, float]:
    """ROUGE over report sections: every gold section of every record is one text pair.

    A section the prediction lacks is empty text; a missing prediction scores 0 everywhere.
    """
    gold_texts, predicted_texts = [], []
    for gold, prediction in zip(golds, predictions, strict=True):
        for section, text in gold.items():
            gold_texts.append(text)
            predicted_texts.append(
                None if prediction is None else prediction.get(section, "")
            )
    return rouge_scores(gold_texts, predicted_texts)


# -----------------------------------------------------------------------------
# per-task scores

_METRIC_ALIASES = {
    "f1": "micro_f1",
    "micro_f1": "micro_f1",
    "macro_f1": "macro_f1",
    "accuracy": "accuracy",
    "acc": "accuracy",
    "rouge_l": "rouge_l",
    "rougel": "rouge_l",
}


def primary_metric(task: dict) -> str:
    """Return the name of the task's primary score.

    PromptCBLUE's own choice wins for its tasks; other tasks use the registry's `metric` field,
    and without one the task type decides (micro-F1, or ROUGE-L for generation types).
    """
    if task["name"] in PROMPTCBLUE_MACRO_F1_TASKS:
        return "macro_f1"
    if task["name"] in PROMPTCBLUE_ROUGE_L_TASKS:
        return "rouge_l"
    metric = task.get("metric")
    if metric:
        key = re.sub(r"[\s-]+", "_", str(metric).strip().lower())
        if key not in _METRIC_ALIASES:
            raise ValueError(
                f"task {task['name']}: unknown metric {metric!r} in the task registry; "
                f"expected one of {METRIC_NAMES}"
            )
        return _METRIC_ALIASES[key]
    return "rouge_l" if task["task_type"] in GENERATION_TYPES else "micro_f1"


def score_task(
    task: dict, rows: list[dict], formats: dict | None = None
) -> dict[str, float]:
    """Score one task's rows ({"gold", "prediction", "answer_choices"}; prediction None when
    missing) and return every metric of its type plus "primary" and the record count."""
    task_type = task["task_type"]
    fmt = (PROMPTCBLUE_ANSWER_FORMATS if formats is None else formats).get(
        task_type, {}
    )
    golds = [row["gold"] for row in rows]
    predictions = [row["prediction"] for row in rows]
    if task_type in EXTRACTION_TYPES:
        scores = extraction_scores(golds, predictions)
    elif task_type in LABEL_TYPES:
        valid = [
            valid_label(row["prediction"], row.get("answer_choices"), fmt)
            for row in rows
        ]
        scores = classification_scores(golds, predictions, valid)
    elif task_type == "report_generation":
        scores = report_rouge_scores(golds, predictions)
    elif task_type == "response_generation":
        scores = rouge_scores(golds, predictions)
    else:
        raise ValueError(
            f"unknown task type {task_type!r}; expected one of {TASK_TYPES}"
        )

    metric = primary_metric(task)
    if metric not in scores:
        raise ValueError(
            f"task {task['name']}: metric {metric} does not apply to task type {task_type}; "
            f"available: {sorted(scores)}"
        )
    return {
        **scores,
        "primary": scores[metric],
        "primary_metric": metric,
        "records": len(rows),
    }
