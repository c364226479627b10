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
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
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
    "ner": {"group": "{type}实体：{entities}", "group_separator": "\n", "separator": "，"},
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

# The demo set's target formats (data_prep.DEMO_ANSWER_FORMATS), in the same keys.
DEMO_PARSE_FORMATS = {
    # "Entities: disease: flu, asthma; symptom: fever" or "Entities: none"
    "ner": {
        "prefix": "Entities: ",
        "group": "{type}: {entities}",
        "group_separator": "; ",
        "separator": ", ",
    },
    # "Triples: (aspirin, treats, fever); (flu, has symptom, cough)" or "Triples: none"
    "spo_generation": {
        "prefix": "Triples: ",
        "triple": "({subject}, {predicate}, {object})",
        "triple_separator": "; ",
    },
    "normalization": {"separator": "; "},
    "cls": {},
    "matching": {},
    "report_generation": {
        "sections": ["Chief complaint", "Diagnosis", "Suggestion"],
        "key_separator": ": ",
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


def _strip_prefix(text: str, prefix: str | None) -> str:
    text = text.strip()
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def _groups(text: str, separator: str) -> list[str]:
    if separator == "\n":
        return _lines(text)
    return [group.strip() for group in text.split(separator) if group.strip()]


def parse_ner(text: str, answer_choices: list[str] | None, fmt: dict) -> list[dict]:
    """Parse one group per entity type ("type: a, b") into {"entity", "type"} items.

    Types outside the record's answer choices are ignored, as PromptCBLUE does, so a
    prompt's type list decides which groups count.
    """
    group_regex = _template_regex(fmt["group"])
    entities = []
    for group in _groups(_strip_prefix(text, fmt.get("prefix")), fmt["group_separator"]):
        match = group_regex.match(group)
        if match is None:
            continue
        entity_type = match["type"].strip()
        if answer_choices and entity_type not in answer_choices:
            continue
        for entity in _split_items(match["entities"], fmt["separator"]):
            entities.append({"entity": entity, "type": entity_type})
    return entities


def parse_spo(text: str, answer_choices: list[str] | None, fmt: dict) -> list[dict]:
    """Parse relation triples into {"predicate", "subject", "object"} items.

    Formats with a `line` template group the pairs of one predicate on a line (PromptCBLUE);
    formats with a `triple` template list whole triples.
    """
    if "triple" in fmt:
        triple_regex = _template_regex(fmt["triple"])
        triples = []
        body = _strip_prefix(text, fmt.get("prefix"))
        for triple_text in _split_items(body, fmt["triple_separator"]):
            match = triple_regex.match(triple_text)
            if match is not None:
                triples.append({name: match[name].strip() for name in _SPO_SLOTS})
        return triples

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


_SPO_SLOTS = ("predicate", "subject", "object")


def parse_normalization(text: str, answer_choices: list[str] | None, fmt: dict) -> list[dict]:
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
            for name, prefix in zip(fields, prefixes, strict=True):
                if part.startswith(prefix) and name not in event:
                    value = part[len(prefix) :].strip()
                    event[name] = (
                        _split_items(value, fmt["separator"]) if name in list_fields else value
                    )
                    break
        if not event:
            continue
        for name in fields:
            event.setdefault(name, [] if name in list_fields else "")
        events.append(event)
    return events


def parse_attributes(text: str, answer_choices: list[str] | None, fmt: dict) -> list[dict]:
    """Parse "entity: attribute" lines into {"entity", "attr"} pairs.

    The split is at the last key separator, so entity names may contain it. Lines with an
    empty entity or attribute, such as a header ending in the separator, are skipped.
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


def parse_report(text: str, answer_choices: list[str] | None, fmt: dict) -> dict[str, str]:
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
        raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")
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


def extraction_scores(golds: list[list], predictions: list[list | None]) -> dict[str, float]:
    """Micro precision, recall and F1 over the item sets of all records.

    A missing prediction (None) is an empty one, and so is the gold of a record that exists
    only in the predictions (None). When gold and prediction are empty in every record there is
    nothing to get wrong, and all three scores are 1.0.
    """
    true_positives = false_positives = false_negatives = 0
    for gold, prediction in zip(golds, predictions, strict=True):
        gold_items = {_item_key(item) for item in gold or []}
        predicted_items = {_item_key(item) for item in prediction or []}
        true_positives += len(gold_items & predicted_items)
        false_positives += len(predicted_items - gold_items)
        false_negatives += len(gold_items - predicted_items)
    if true_positives + false_positives + false_negatives == 0:
        return {"precision": 1.0, "recall": 1.0, "micro_f1": 1.0}
    precision = true_positives / (true_positives + false_positives) if true_positives else 0.0
    recall = true_positives / (true_positives + false_negatives) if true_positives else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "micro_f1": _f1(precision, recall),
    }


def valid_label(label: str | None, answer_choices: list[str] | None, fmt: dict) -> bool:
    """Return whether `label` is one of the record's answer choices or the format's none label."""
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
    false negative of the gold label and a false positive of no label. A record that exists
    only in the predictions (gold None) is wrong and has no gold label.
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
        if gold is not None:
            false_negatives[gold] += 1
        if is_valid:
            false_positives[prediction] += 1

    labels = {gold for gold in golds if gold is not None} | set(false_positives)
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
    macro_f1 = sum(f1_per_label) / len(labels) if labels else 0.0
    return {"accuracy": accuracy, "micro_f1": accuracy, "macro_f1": macro_f1}


_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(_ROUGE_TYPES), tokenizer=CharWordTokenizer())


def rouge_pair_scores(scorer, gold: str | None, prediction: str | None) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one text pair; two empty texts match exactly, a missing one scores 0."""
    if prediction is None or gold is None:
        return {name: 0.0 for name in _ROUGE_TYPES}
    if not CharWordTokenizer().tokenize(gold) and not CharWordTokenizer().tokenize(prediction):
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


def report_rouge_scores(golds: list[dict], predictions: list[dict | None]) -> dict[str, float]:
    """ROUGE over report sections: every gold section of every record is one text pair.

    A section the prediction lacks is empty text, and a missing prediction scores 0 in every
    section. A record that exists only in the predictions (gold None) is one pair scoring 0.
    """
    gold_texts, predicted_texts = [], []
    for gold, prediction in zip(golds, predictions, strict=True):
        if gold is None:
            gold_texts.append(None)
            predicted_texts.append(None)
            continue
        for section, text in gold.items():
            gold_texts.append(text)
            predicted_texts.append(None if prediction is None else prediction.get(section, ""))
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

    PromptCBLUE's own choice wins for its tasks. Other tasks use the registry's `metric` field,
    and without one the task type decides: ROUGE-L for generation types, else micro-F1.
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


def score_task(task: dict, rows: list[dict], formats: dict | None = None) -> dict[str, float]:
    """Score one task's rows ({"gold", "prediction", "answer_choices"}; prediction None when
    missing) and return every metric of its type plus "primary" and the record count."""
    task_type = task["task_type"]
    fmt = (PROMPTCBLUE_ANSWER_FORMATS if formats is None else formats).get(task_type, {})
    golds = [row["gold"] for row in rows]
    predictions = [row["prediction"] for row in rows]
    if task_type in EXTRACTION_TYPES:
        scores = extraction_scores(golds, predictions)
    elif task_type in LABEL_TYPES:
        valid = [valid_label(row["prediction"], row.get("answer_choices"), fmt) for row in rows]
        scores = classification_scores(golds, predictions, valid)
    elif task_type == "report_generation":
        scores = report_rouge_scores(golds, predictions)
    elif task_type == "response_generation":
        scores = rouge_scores(golds, predictions)
    else:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")

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


# -----------------------------------------------------------------------------
# generation


@dataclass
class GenerationConfig:
    batch_size: int = 8  # prompts per generate() call; every batch contains one task
    max_new_tokens: int | None = None  # cap for every task; None derives it per task
    new_token_margin: int = 16  # tokens added to the cap derived from the longest train target
    max_length: int = 1024  # prompt tokens kept (the input side is truncated beyond this)
    merge: bool = True  # fold the task's update into the weights while generating its batches
    do_sample: bool = False  # greedy decoding unless set, so scores are reproducible
    temperature: float = 1.0  # sampling temperature (with do_sample)
    top_p: float = 1.0  # nucleus sampling mass (with do_sample)
    seed: int = 0  # torch seed for sampling


def max_new_tokens_for_task(task: dict, tokenizer, prompts: list[str], cfg: GenerationConfig):
    """Return the task's cap on new tokens.

    The registry stores the longest train target in characters (`max_target_chars`). The cap
    is that length times the tokens-per-character ratio of the task's own prompts, which share
    the targets' language and script, times 1.25, plus `cfg.new_token_margin`.
    """
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens
    max_chars = task.get("max_target_chars")
    if not max_chars:
        raise ValueError(
            f"task {task['name']}: the task registry has no max_target_chars; rerun data_prep.py "
            "or pass --max-new-tokens"
        )
    chars = sum(len(prompt) for prompt in prompts)
    tokens = sum(
        len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt in prompts
    )
    tokens_per_char = tokens / chars if chars else 1.0
    return math.ceil(max_chars * tokens_per_char * 1.25) + cfg.new_token_margin


def _can_merge(model) -> bool:
    """Return whether merging is exact enough to match routed generation.

    The token gate mixes experts per token, so it cannot merge. In bfloat16 or float16 weights,
    W + delta - delta does not restore W, and each merged task would leave rounding error in
    the base weights for the tasks after it, so those models route every batch instead.
    """
    import torch

    if getattr(getattr(model, "adapter_config", None), "gate", None) != "task":
        return False
    return all(
        layer.base_layer.weight.dtype == torch.float32 for layer in model.adapted_layers().values()
    )


def generate_task(
    model,
    tokenizer,
    records: list[dict],
    task_id: int,
    max_new_tokens: int,
    cfg: GenerationConfig,
    desc: str,
) -> list[str]:
    """Generate an answer for every record of one task; return the texts in record order.

    Prompts are sorted by length (longest first) and left-padded, so each batch pads little
    and generation starts at the same position for every row.
    """
    import torch
    from tqdm import tqdm

    from data_prep import collate, encode_prompt

    is_adapter = hasattr(model, "adapter_config")
    merged = cfg.merge and _can_merge(model)
    prompts = [
        encode_prompt(record["input"], tokenizer, max_length=cfg.max_length) for record in records
    ]
    order = sorted(range(len(records)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(records)
    generation_kwargs = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": cfg.do_sample,
    }
    if cfg.do_sample:
        generation_kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:
        # Clear the model's default sampling settings, which greedy decoding ignores with a warning.
        generation_kwargs.update(temperature=None, top_p=None, top_k=None)

    if merged:
        model.merge(task_id)
    try:
        with tqdm(total=len(records), desc=desc, unit="rec", leave=False) as bar:
            for start in range(0, len(order), cfg.batch_size):
                indices = order[start : start + cfg.batch_size]
                examples = [{"input_ids": prompts[i], "task_id": task_id} for i in indices]
                batch = collate(examples, tokenizer.pad_token_id, padding_side="left")
                inputs = {
                    "input_ids": batch["input_ids"].to(model.device),
                    "attention_mask": batch["attention_mask"].to(model.device),
                }
                if is_adapter:
                    inputs["task_ids"] = batch["task_ids"].to(model.device)
                with torch.no_grad():
                    sequences = model.generate(**inputs, **generation_kwargs)
                new_tokens = sequences[:, inputs["input_ids"].shape[1] :]  # (B, T_new)
                for i, row in zip(indices, new_tokens.tolist(), strict=True):
                    texts[i] = tokenizer.decode(row, skip_special_tokens=True)
                bar.update(len(indices))
    finally:
        if merged:
            model.unmerge()
    return texts


def generate_predictions(
    model,
    tokenizer,
    tasks: list[dict],
    records: list[dict],
    cfg: GenerationConfig,
) -> list[dict]:
    """Generate and parse answers for all records, task by task; return prediction rows."""
    import torch

    torch.manual_seed(cfg.seed)
    by_task = defaultdict(list)
    for record in records:
        by_task[record["task_id"]].append(record)

    rows = []
    for task in tasks:
        task_records = by_task.get(task["id"], [])
        if not task_records:
            continue
        prompts = [record["input"] for record in task_records]
        max_new_tokens = max_new_tokens_for_task(task, tokenizer, prompts, cfg)
        texts = generate_task(
            model, tokenizer, task_records, task["id"], max_new_tokens, cfg, desc=task["name"]
        )
        for record, text in zip(task_records, texts, strict=True):
            rows.append(prediction_row(record, task, text))
        logger.info(
            "task=%s records=%d max_new_tokens=%d", task["name"], len(task_records), max_new_tokens
        )
    return rows


def prediction_row(record: dict, task: dict, generation: str) -> dict:
    """Build one predictions.jsonl line: ids, input, raw generation, parsed and gold answer."""
    choices = record.get("answer_choices")
    formats = answer_formats(task)
    return {
        "sample_id": record["sample_id"],
        "task": task["name"],
        "input": record["input"],
        "generation": generation,
        "prediction": parse_answer(generation, task["task_type"], choices, formats),
        "gold": parse_answer(record["target"], task["task_type"], choices, formats),
    }


# -----------------------------------------------------------------------------
# scoring prediction rows against the data


def read_predictions(path) -> list[dict]:
    """Read predictions.jsonl, checking that every line has sample_id, task and generation."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: invalid JSON ({error})") from None
            sample_id = row.get("sample_id") if isinstance(row, dict) else None
            if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
                raise ValueError(
                    f"{path}, line {line_number}: field 'sample_id' is missing or not a string "
                    "or integer"
                )
            for name in ("task", "generation"):
                if not isinstance(row.get(name), str):
                    raise ValueError(
                        f"{path}, line {line_number}: field {name!r} is missing or not a string"
                    )
            rows.append(row)
    return rows


def score_predictions(
    tasks: list[dict], records: list[dict], rows: list[dict], formats_for=None
) -> dict:
    """Score generated text against the records, task by task.

    Every row's `generation` is parsed again, so a parser fix applies to old files. Records
    without a row (missing ids) score as empty answers. Rows without a record (extra ids) score
    as wrong answers of their task. Returns {"tasks": {name: scores}, "average", "missing_ids",
    "extra_ids"}, where both id lists hold "task/sample_id" strings.
    """
    formats_for = formats_for or answer_formats
    tasks_by_name = {task["name"]: task for task in tasks}
    tasks_by_id = {task["id"]: task for task in tasks}
    rows_by_key = {}
    for row in rows:
        key = (row["task"], row["sample_id"])
        if key in rows_by_key:
            raise ValueError(f"duplicate prediction for task {key[0]}, sample {key[1]}")
        rows_by_key[key] = row

    scored = defaultdict(list)
    missing = []
    for record in records:
        task = tasks_by_id[record["task_id"]]
        formats = formats_for(task)
        choices = record.get("answer_choices")
        row = rows_by_key.pop((task["name"], record["sample_id"]), None)
        if row is None:
            missing.append(f"{task['name']}/{record['sample_id']}")
        prediction = (
            None
            if row is None
            else parse_answer(row["generation"], task["task_type"], choices, formats)
        )
        gold = parse_answer(record["target"], task["task_type"], choices, formats)
        scored[task["name"]].append(
            {"gold": gold, "prediction": prediction, "answer_choices": choices}
        )

    # Whatever is left has no record: an extra id, scored against an empty gold answer.
    extra = []
    for (task_name, sample_id), row in rows_by_key.items():
        extra.append(f"{task_name}/{sample_id}")
        task = tasks_by_name.get(task_name)
        if task is None:
            continue  # listed above; no task to charge it to
        choices = row.get("answer_choices")
        prediction = parse_answer(row["generation"], task["task_type"], choices, formats_for(task))
        scored[task_name].append(
            {"gold": None, "prediction": prediction, "answer_choices": choices}
        )

    if missing:
        logger.warning(
            "%d records have no prediction (scored as empty): %s",
            len(missing),
            ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
        )
    if extra:
        logger.warning(
            "%d predictions have no record (scored as wrong): %s",
            len(extra),
            ", ".join(extra[:10]) + (" ..." if len(extra) > 10 else ""),
        )

    task_scores = {}
    for task in tasks:
        if scored.get(task["name"]):
            task_scores[task["name"]] = score_task(task, scored[task["name"]], formats_for(task))
    primaries = [scores["primary"] for scores in task_scores.values()]
    return {
        "tasks": task_scores,
        "average": sum(primaries) / len(primaries) if primaries else 0.0,
        "missing_ids": missing,
        "extra_ids": extra,
    }


def answer_formats(task: dict) -> dict:
    """Return the answer formats (per task type) that the task's targets follow: the demo
    set's for the embedded demo tasks, PromptCBLUE's for every other task."""
    from data_prep import DEMO_TASKS

    return DEMO_PARSE_FORMATS if task["name"] in DEMO_TASKS else PROMPTCBLUE_ANSWER_FORMATS


# -----------------------------------------------------------------------------
# models and adapters


def check_adapter_tasks(adapter_config: dict, tasks: list[dict], path) -> None:
    """Raise ValueError unless the adapter was trained on the data's tasks with the same ids."""
    adapter_names = list(adapter_config.get("task_names") or [])
    data_names = [task["name"] for task in tasks]
    if adapter_names == data_names:
        return
    missing = [name for name in data_names if name not in adapter_names]
    unknown = [name for name in adapter_names if name not in data_names]
    moved = [
        f"{name} (adapter id {adapter_names.index(name)}, data id {data_names.index(name)})"
        for name in data_names
        if name in adapter_names and adapter_names.index(name) != data_names.index(name)
    ]
    details = []
    if missing:
        details.append(f"tasks the adapter was not trained on: {missing}")
    if unknown:
        details.append(f"adapter tasks absent from the data: {unknown}")
    if moved:
        details.append(f"tasks with different ids: {moved}")
    raise ValueError(
        f"adapter {path} does not match the data's tasks.json: "
        + "; ".join(details)
        + ". Evaluate on the data directory the adapter was trained with."
    )


def load_for_evaluation(
    spec: str,
    tasks: list[dict],
    model_name: str | None,
    device,
    dtype,
    trust_remote_code: bool = False,
):
    """Load the model for one column: `none` is the base model, anything else an adapter folder.

    The base model is `model_name` when given, else the one the adapter records.
    Returns (model, tokenizer, adapter_config or None).
    """
    from moelora import MoELoRAModel
    from train import load_model_and_tokenizer

    if spec == "none":
        model, tokenizer = load_model_and_tokenizer(
            model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        return model, tokenizer, None

    adapter_config = MoELoRAModel.read_adapter_config(spec)
    check_adapter_tasks(adapter_config, tasks, spec)
    base_name = model_name or adapter_config.get("base_model_name_or_path")
    base, tokenizer = load_model_and_tokenizer(
        base_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    model = MoELoRAModel.from_pretrained(base, spec).eval()
    return model, tokenizer, adapter_config


def gate_summary(model, tasks: list[dict]) -> dict | None:
    """Return the gate weights (task x expert) and the gate entropy per task, in nats.

    Entropy ranges from 0 (one expert) to ln(E) (uniform mixing). Returns None for the token
    gate and for a single expert (plain LoRA), whose weights are all 1.
    """
    import torch

    adapter_config = getattr(model, "adapter_config", None)
    if getattr(adapter_config, "gate", None) != "task" or adapter_config.num_experts == 1:
        return None
    with torch.no_grad():
        task_ids = torch.arange(len(tasks))
        weights = model.gate_weights(task_ids).float().cpu()  # (K, E)
    entropy = (-weights * weights.clamp_min(1e-12).log()).sum(dim=-1).clamp_min(0.0)  # (K,)
    return {
        "weights": {task["name"]: weights[task["id"]].tolist() for task in tasks},
        "entropy": {task["name"]: float(entropy[task["id"]]) for task in tasks},
        "max_entropy": math.log(weights.shape[1]),
    }


# -----------------------------------------------------------------------------
# outputs


def _default_file_mode() -> int:
    # mkstemp creates files readable by the owner only; outputs get the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_predictions(path: Path, rows: list[dict]) -> None:
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    _write_atomic(path, "".join(lines))


def results_table(tasks: list[dict], columns: dict[str, dict]) -> str:
    """Format a Markdown table with one row per task (primary score x 100), one column per
    model and the average last. With several columns the best score of each row is bold,
    unless every column ties."""
    names = list(columns)
    header = "| task | type | metric | " + " | ".join(names) + " |"
    lines = [header, "|" + " --- |" * (3 + len(names))]
    task_rows = []
    for task in tasks:
        scores = [columns[name]["tasks"].get(task["name"]) for name in names]
        if all(score is None for score in scores):
            continue
        metric = next(score["primary_metric"] for score in scores if score is not None)
        values = [None if score is None else score["primary"] for score in scores]
        task_rows.append((task["name"], task["task_type"], metric, values))
    averages = [columns[name]["average"] for name in names]
    task_rows.append(("**average**", "", "", averages))

    for name, task_type, metric, values in task_rows:
        present = [value for value in values if value is not None]
        best = max(present, default=None)
        # A row where every column ties has no best score to mark.
        mark = len(present) > 1 and not all(math.isclose(value, best) for value in present)
        cells = []
        for value in values:
            if value is None:
                cells.append("-")
                continue
            cell = f"{100 * value:.2f}"
            if mark and math.isclose(value, best):
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {name} | {task_type} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_gates(path: Path, gates: dict[str, dict]) -> None:
    """Write one heatmap of task x expert gate weights per model with a task gate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(gates), figsize=(5 * len(gates), 4), squeeze=False)
    for ax, (name, gate) in zip(axes[0], gates.items(), strict=True):
        task_names = list(gate["weights"])
        weights = [gate["weights"][task] for task in task_names]  # (K, E)
        image = ax.imshow(weights, cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_title(f"{name}: gate weights")
        ax.set_xlabel("expert")
        ax.set_xticks(range(len(weights[0])))
        ax.set_yticks(range(len(task_names)))
        ax.set_yticklabels(
            [f"{task} (H={gate['entropy'][task]:.2f})" for task in task_names], fontsize=7
        )
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(temporary, dpi=120)
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
        plt.close(fig)


# -----------------------------------------------------------------------------
# command line


def select_records(
    records: list[dict], tasks: list[dict], task_names: list[str] | None, limit: int | None
) -> list[dict]:
    """Keep the records of the named tasks (all when None), at most `limit` per task."""
    known = {task["name"] for task in tasks}
    if task_names:
        unknown = [name for name in task_names if name not in known]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the data has {sorted(known)}")
    selected, per_task = [], Counter()
    for record in records:
        name = record["task_dataset"]
        if task_names and name not in task_names:
            continue
        if limit is not None and per_task[name] >= limit:
            continue
        per_task[name] += 1
        selected.append(record)
    return selected


def column_labels(specs: list[str]) -> list[str]:
    """Table column names: "base" for none, else the adapter folder name (the path if two
    folders share a name)."""
    names = ["base" if spec == "none" else Path(spec).name or spec for spec in specs]
    return [
        spec if names.count(name) > 1 and spec != "none" else name
        for spec, name in zip(specs, names, strict=True)
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    # What to evaluate.
    parser.add_argument(
        "--data",
        default="data",
        help="prepared data directory with tasks.json (default: %(default)s)",
    )
    parser.add_argument(
        "--split",
        default="test",
        help="split to evaluate: train, dev or test (default: %(default)s)",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--adapter", help="adapter folder, or none for the base model")
    mode.add_argument(
        "--compare",
        nargs="+",
        metavar="ADAPTER",
        help="adapter folders (or none) scored on the same records, one column each",
    )
    mode.add_argument(
        "--predictions",
        metavar="FILE",
        help="rescore an existing predictions.jsonl without a model",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="base model id or folder (default: the one the adapter records, "
        "else the packaged SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--out",
        default="runs/eval",
        help="output folder for predictions, results.json, results.md, gates.png "
        "(default: %(default)s)",
    )

    # Which records.
    parser.add_argument("--tasks", nargs="+", default=None, help="task names to evaluate")
    parser.add_argument(
        "--limit", type=int, default=None, help="max records per task (default: all)"
    )

    # Generation.
    defaults = GenerationConfig()
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="prompts per generate() call (default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="cap on generated tokens for every task (default: per task, from "
        "the longest train target in tasks.json)",
    )
    parser.add_argument(
        "--new-token-margin",
        type=int,
        default=defaults.new_token_margin,
        help="tokens added to each per-task cap (default: %(default)s)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        help="max prompt tokens; longer inputs are shortened (default: %(default)s)",
    )
    parser.add_argument(
        "--no-merge",
        action="store_true",
        help="route every batch through the gate instead of merging the task's "
        "update into the weights",
    )

    # Sampling, off by default.
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    parser.add_argument(
        "--temperature",
        type=float,
        default=defaults.temperature,
        help="sampling temperature (default: %(default)s)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=defaults.top_p,
        help="nucleus sampling probability mass (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="torch seed for sampling (default: %(default)s)",
    )

    # Hardware.
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, else float32)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model folder or hub repository",
    )
    return parser.parse_args(argv)


def evaluate_columns(args, tasks, records, cfg: GenerationConfig, out: Path) -> dict[str, dict]:
    """Generate, save and score predictions for each --adapter / --compare entry."""
    import torch

    from moelora import MoELoRAModel
    from train import resolve_device_and_dtype

    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    specs = args.compare or [args.adapter]

    # Without --model, `none` means the base model of the adapters it is compared with.
    base_name = args.model
    adapters = [spec for spec in specs if spec != "none"]
    if base_name is None and adapters:
        base_name = MoELoRAModel.read_adapter_config(adapters[0]).get("base_model_name_or_path")

    columns = {}
    for spec, label in zip(specs, column_labels(specs), strict=True):
        logger.info("evaluating %s on %d records (adapter: %s)", label, len(records), spec)
        model_name = base_name if spec == "none" else args.model
        model, tokenizer, _ = load_for_evaluation(
            spec, tasks, model_name, device, dtype, args.trust_remote_code
        )
        rows = generate_predictions(model, tokenizer, tasks, records, cfg)
        folder = out / label if args.compare else out
        write_predictions(folder / "predictions.jsonl", rows)
        result = score_predictions(tasks, records, rows)
        result["adapter"] = spec
        result["base_model"] = getattr(model.config, "name_or_path", None)
        gate = gate_summary(model, tasks)
        if gate is not None:
            result["gate"] = gate
        columns[label] = result
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return columns


def rescore_column(args, tasks, records) -> dict[str, dict]:
    """Score --predictions FILE; rows of split records left out by --tasks/--limit are skipped."""
    from data_prep import load_split

    rows = read_predictions(args.predictions)
    selected = {(record["task_dataset"], record["sample_id"]) for record in records}
    in_split = {(r["task_dataset"], r["sample_id"]) for r in load_split(args.data, args.split)}
    rows = [
        row
        for row in rows
        if (row["task"], row["sample_id"]) in selected
        or (row["task"], row["sample_id"]) not in in_split
    ]
    result = score_predictions(tasks, records, rows)
    result["predictions"] = str(args.predictions)
    return {Path(args.predictions).stem: result}


def main(argv=None) -> dict:
    """Run the evaluation the command line asks for, write the outputs and return the results."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from data_prep import load_split, load_tasks

    tasks = load_tasks(args.data)
    records = select_records(load_split(args.data, args.split), tasks, args.tasks, args.limit)
    if not records:
        raise ValueError(f"no records to evaluate in {args.data} split {args.split}")
    cfg = GenerationConfig(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        new_token_margin=args.new_token_margin,
        max_length=args.max_length,
        merge=not args.no_merge,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    out = Path(args.out)
    if args.predictions:
        columns = rescore_column(args, tasks, records)
    else:
        columns = evaluate_columns(args, tasks, records, cfg, out)

    for label, result in columns.items():
        for name, scores in result["tasks"].items():
            logger.info(
                "model=%s task=%s records=%d %s=%.4f",
                label,
                name,
                scores["records"],
                scores["primary_metric"],
                scores["primary"],
            )
        logger.info(
            "model=%s average=%.4f missing=%d extra=%d",
            label,
            result["average"],
            len(result["missing_ids"]),
            len(result["extra_ids"]),
        )

    results = {
        "data": str(args.data),
        "split": args.split,
        "records": len(records),
        "generation": None if args.predictions else asdict(cfg),
        "models": columns,
    }
    _write_atomic(out / "results.json", json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    table = results_table(tasks, columns)
    notes = [
        f"Split `{args.split}` of `{args.data}`, {len(records)} records; scores x 100.",
    ]
    for label, result in columns.items():
        if result["missing_ids"] or result["extra_ids"]:
            notes.append(
                f"{label}: records without a prediction: {len(result['missing_ids'])}; "
                f"predictions without a record: {len(result['extra_ids'])} (both scored as wrong)."
            )
    _write_atomic(out / "results.md", table + "\n" + "\n".join(notes) + "\n")
    gates = {label: result["gate"] for label, result in columns.items() if "gate" in result}
    if gates:
        plot_gates(out / "gates.png", gates)
    print(table)
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
