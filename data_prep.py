"""Prepare multi-task data for MOELoRA: read task files, split per task, tokenize, demo set.

Everything between task files on disk and token batches lives here. MOELoRA (Liu et al.,
"When MOE Meets LLMs: Parameter Efficient Fine-tuning for Multi-task Medical Applications",
SIGIR 2024, arXiv 2310.18339) feeds the task id of each example to the expert gate, so this
file also assigns the task ids.

Input records use the PromptCBLUE format, one JSON object a line:

    input           str         the prompt shown to the model
    target          str         the expected answer ("" marks an unlabelled record)
    task_dataset    str         the task name, e.g. "CMeIE"
    task_type       str         e.g. "cls", "ner", "normalization", "spo_generation"
    answer_choices  list | null the allowed labels or entity types of this record
    sample_id       str | int   an id, unique within one file

Lines may end in LF, CRLF or a bare CR, a UTF-8 byte-order mark is skipped and blank lines are
ignored. A prepared data directory contains `train.jsonl`, `dev.jsonl`, `test.jsonl` (records
in the same format) and `tasks.json`, the task registry: a JSON list with one object per task,

    {"name", "id", "task_type", "metric", "answer_choices", "counts", "max_target_chars",
     "source_counts"}

where ids are 0..K-1 in sorted task-name order, `counts` is the record count per split,
`answer_choices` the union of the choices seen in that task's records (first-seen order; null
when no record has choices or when they number more than 200), `max_target_chars` the longest
training target in characters, and `source_counts` the records read, dropped as duplicates
and dropped for an empty target.
`tasks.json` is written last, so a directory without it is incomplete.

Prompt format: with a chat template, `input` is the user turn and `target` the assistant turn.
Without one, the fallback format is the plain text

    User: {input}\\nAssistant:{target}<eos>

where the prompt side is tokenized with the tokenizer's default special tokens (a BOS where
the tokenizer adds one) and the target side without, followed by the EOS token. Labels are
-100 on the prompt and on padding, so the target tokens and the end-of-turn token carry the loss.

The embedded demo set (no --source) has five English clinical tasks, one per PromptCBLUE task
type below (triage, clinical_ner, term_normalization, drug_relations, visit_report), generated
from the fact tables in this file. Its answer formats:

    task type          answer format (target text)
    cls                the label text alone, one of the record's answer_choices
    ner                "Entities: disease: a, b; symptom: c; drug: d" (types in that order,
                       only the types found, entities in order of appearance) or "Entities: none"
    normalization      the matching standard terms joined by "; "
    spo_generation     "Triples: (head, relation, tail); (head, relation, tail)" or
                       "Triples: none"; relations are "treats" and "has symptom"
    report_generation  "Chief complaint: ...\\nDiagnosis: ...\\nSuggestion: ..." (three lines)

Usage:

    python data_prep.py --out data/                          # the embedded demo set
    python data_prep.py --source path/to/promptcblue/cblue-aug --tasks paper --out data/cblue
"""

import argparse
import json
import logging
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("data_prep")

# -----------------------------------------------------------------------------
# constants

SPLITS = ("train", "dev", "test")

# Required record fields and their allowed types; answer_choices is checked separately because
# it is a list of strings or null.
RECORD_FIELDS = ("input", "target", "task_dataset", "task_type", "answer_choices", "sample_id")

# The eight tasks of the MOELoRA paper's PromptCBLUE experiments (`--tasks paper`).
PAPER_TASKS = (
    "CMeIE",
    "CHIP-CDN",
    "CHIP-CDEE",
    "CHIP-MDCFNPC",
    "CHIP-CTC",
    "KUAKE-QIC",
    "IMCS-V2-MRG",
    "MedDG",
)

# Primary metric of each PromptCBLUE task, as the PromptCBLUE benchmark scores them: macro-F1
# for three classification tasks, ROUGE-L for the two generation tasks, micro-F1 for the rest.
PROMPTCBLUE_METRICS = {
    "CMeEE-V2": "micro_f1",
    "CMeIE": "micro_f1",
    "CHIP-CDN": "micro_f1",
    "CHIP-CDEE": "micro_f1",
    "CHIP-MDCFNPC": "micro_f1",
    "CHIP-CTC": "macro_f1",
    "CHIP-STS": "micro_f1",
    "IMCS-V2-NER": "micro_f1",
    "IMCS-V2-SR": "micro_f1",
    "IMCS-V2-DAC": "macro_f1",
    "IMCS-V2-MRG": "rouge_l",
    "KUAKE-IR": "micro_f1",
    "KUAKE-QIC": "macro_f1",
    "KUAKE-QQR": "micro_f1",
    "KUAKE-QTR": "micro_f1",
    "MedDG": "rouge_l",
}

# Metric of any other task, by its task type; types not listed here get micro-F1.
METRICS_BY_TASK_TYPE = {
    "cls": "macro_f1",
    "report_generation": "rouge_l",
    "response_generation": "rouge_l",
}

# Exact answer format of the demo tasks, by task type (see the module docstring for examples).
DEMO_ANSWER_FORMATS = {
    "cls": "{label}",
    "ner": "Entities: {type}: {entity}, {entity}; {type}: {entity}  |  Entities: none",
    "normalization": "{term}; {term}",
    "spo_generation": "Triples: ({head}, {relation}, {tail}); ({head}, {relation}, {tail})"
    "  |  Triples: none",
    "report_generation": "Chief complaint: {text}\nDiagnosis: {text}\nSuggestion: {text}",
}

# Prompt text used when the tokenizer has no chat template.
FALLBACK_PROMPT = "User: {input}\nAssistant:"

IGNORE_INDEX = -100

# A task whose records offer more distinct answer choices than this (CHIP-CDN offers each record
# its own candidate terms, over 11,000 in all) stores null in tasks.json: such choices belong to
# the records, and the registry travels inside every adapter config.
MAX_REGISTRY_CHOICES = 200


@dataclass
class PrepConfig:
    sources: list[str] = field(default_factory=list)  # files or folders to split (empty: demo set)
    dev: list[str] = field(default_factory=list)  # files used as the dev split as they are
    test: list[str] = field(default_factory=list)  # files used as the test split as they are
    out: str = "data"  # output directory
    tasks: list[str] = field(default_factory=list)  # task names to keep, or ["paper"]; [] = all
    max_per_task: int | None = None  # cap on training records per task
    max_dev_per_task: int | None = None  # cap on dev records per task
    max_test_per_task: int | None = None  # cap on test records per task
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/dev/test fractions per task
    seed: int = 0  # seed of the per-task shuffles and of the demo set


# -----------------------------------------------------------------------------
# reading and validating task files

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _field_error(path, line_no: int, field_name: str | None, message: str) -> ValueError:
    where = f"{path}:{line_no}"
    if field_name is not None:
        where += f": field '{field_name}'"
    return ValueError(f"{where}: {message}")


def _invalid_utf8_error(path, line_no: int, raw: bytes, exc: UnicodeDecodeError) -> ValueError:
    """Build the error for a line that is not UTF-8, naming the field that contains the bytes."""
    bad = f"invalid UTF-8 byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line"
    text = raw.decode("utf-8", errors="surrogateescape")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        for name, value in obj.items():
            if isinstance(value, str) and _SURROGATE.search(value):
                return _field_error(path, line_no, name, f"{bad}; re-encode the file as UTF-8")
    return _field_error(path, line_no, None, f"{bad}; re-encode the file as UTF-8")


def validate_record(obj, path, line_no: int) -> dict:
    """Check one parsed line and return its six fields; raise ValueError naming file/line/field."""
    if not isinstance(obj, dict):
        raise _field_error(path, line_no, None, f"expected a JSON object, got {type(obj).__name__}")
    for name in RECORD_FIELDS:
        if name not in obj:
            raise _field_error(path, line_no, name, "missing (every record needs the six fields)")

    for name in ("input", "target", "task_dataset", "task_type"):
        if not isinstance(obj[name], str):
            got = type(obj[name]).__name__
            raise _field_error(path, line_no, name, f"expected a string, got {got}")
    if not obj["task_dataset"].strip():
        raise _field_error(path, line_no, "task_dataset", "empty task name")

    choices = obj["answer_choices"]
    if choices is not None:
        if not isinstance(choices, list):
            got = type(choices).__name__
            raise _field_error(
                path, line_no, "answer_choices", f"expected a list or null, got {got}"
            )
        for choice in choices:
            if not isinstance(choice, str):
                got = type(choice).__name__
                raise _field_error(
                    path, line_no, "answer_choices", f"expected a list of strings, got a {got}"
                )

    sample_id = obj["sample_id"]
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        got = type(sample_id).__name__
        raise _field_error(path, line_no, "sample_id", f"expected a string or integer, got {got}")

    # JSON escapes can encode unpaired surrogates, which no UTF-8 file can hold.
    for name in ("input", "target", "task_dataset", "task_type"):
        if _SURROGATE.search(obj[name]):
            raise _field_error(path, line_no, name, "contains an unpaired UTF-16 surrogate escape")
    return {name: obj[name] for name in RECORD_FIELDS}


def read_records(path: str | Path) -> list[tuple[dict, int]]:
    """Read and validate one task file; return (record, line number) pairs.

    Lines end in LF, CRLF or a bare CR. JSON strings cannot hold a raw line break, so splitting
    the bytes on all three is exact. A leading UTF-8 byte-order mark is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]

    records = []
    for line_no, raw in enumerate(_LINE_BREAK.split(data), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _invalid_utf8_error(path, line_no, raw, exc) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _field_error(
                path,
                line_no,
                None,
                f"invalid JSON ({exc.msg}: column {exc.colno}); a task file needs one JSON "
                "record per line",
            ) from None
        records.append((validate_record(obj, path, line_no), line_no))

    if not records:
        raise ValueError(f"{path}: no records: the file is empty or contains only blank lines")
    return records


def find_task_files(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (every *.json and *.jsonl directly inside) to a file list."""
    files = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
            if not found:
                raise FileNotFoundError(f"no *.json or *.jsonl files in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"source {path} not found")
    return files


# -----------------------------------------------------------------------------
# the task registry and prepared directories


def task_metric(name: str, task_type: str) -> str:
    """Return the primary metric name of a task: PromptCBLUE's choice, else by task type."""
    if name in PROMPTCBLUE_METRICS:
        return PROMPTCBLUE_METRICS[name]
    return METRICS_BY_TASK_TYPE.get(task_type, "micro_f1")


def load_tasks(data_dir: str | Path) -> list[dict]:
    """Read DIR/tasks.json and return its task entries in id order."""
    path = Path(data_dir) / "tasks.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a prepared data directory "
            "(create one with: python data_prep.py --out DIR)"
        )
    with open(path, encoding="utf-8") as f:
        tasks = json.load(f)
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: expected a JSON list of tasks")

    for index, task in enumerate(tasks):
        for name in ("name", "id", "task_type", "metric", "answer_choices", "counts"):
            if not isinstance(task, dict) or name not in task:
                raise ValueError(f"{path}: task entry {index} has no field '{name}'")
    tasks = sorted(tasks, key=lambda task: task["id"])
    if [task["id"] for task in tasks] != list(range(len(tasks))):
        raise ValueError(f"{path}: task ids must be 0..{len(tasks) - 1}, each used once")
    return tasks


def load_split(data_dir: str | Path, split: str) -> list[dict]:
    """Read DIR/{split}.jsonl and return its records, each with "task_id" from tasks.json."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    task_ids = {task["name"]: task["id"] for task in load_tasks(data_dir)}
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")

    records = []
    for line_no, raw in enumerate(_LINE_BREAK.split(path.read_bytes()), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _field_error(path, line_no, None, f"invalid JSON line ({exc})") from None
        record = validate_record(obj, path, line_no)
        if record["task_dataset"] not in task_ids:
            raise _field_error(
                path,
                line_no,
                "task_dataset",
                f"task {record['task_dataset']!r} is not in {Path(data_dir) / 'tasks.json'}",
            )
        record["task_id"] = task_ids[record["task_dataset"]]
        records.append(record)
    return records


# -----------------------------------------------------------------------------
# prompt formatting and tokenization


# Rendered text around the user content, per chat template: (before, after), or None when the
# template does not insert the content verbatim (it trims it, say) and must render every prompt.
_PROMPT_PIECES: dict[tuple[str, str], tuple[str, str] | None] = {}
_SENTINEL = " \n\ue000\n "  # private-use character padded with whitespace a template might trim


def _render_prompt(input_text: str, tokenizer) -> str:
    """Return the prompt text: the user turn plus the assistant generation prompt."""
    if tokenizer.chat_template is None:
        return FALLBACK_PROMPT.format(input=input_text)

    # Rendering a Jinja template costs as much as tokenizing, so render it once per template.
    key = (repr(tokenizer.chat_template), repr(tokenizer.special_tokens_map))
    if key not in _PROMPT_PIECES:
        messages = [{"role": "user", "content": _SENTINEL}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pieces = text.split(_SENTINEL)
        _PROMPT_PIECES[key] = (pieces[0], pieces[1]) if len(pieces) == 2 else None
    if _PROMPT_PIECES[key] is None:
        messages = [{"role": "user", "content": input_text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    before, after = _PROMPT_PIECES[key]
    return before + input_text + after


def _tokenize_prompt(input_text: str, tokenizer) -> list[int]:
    prompt_text = _render_prompt(input_text, tokenizer)

    # Chat templates write their own special tokens (BOS, turn markers) as text.
    add_special = tokenizer.chat_template is None
    return tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"]


def _tokenize_answer(input_text: str, target: str, tokenizer) -> list[int]:
    """Return the answer ids: the target tokens followed by the end-of-turn token.

    With a chat template, the full conversation is rendered and must start with the rendered
    prompt. The text between the two is the assistant content (some templates add text before
    the target); after it the template's first special token (`<|im_end|>` for ChatML) ends the
    turn, and whatever follows it (a newline) is not part of the answer.
    """
    if tokenizer.eos_token_id is None and tokenizer.chat_template is None:
        raise ValueError("the tokenizer has neither a chat template nor an EOS token")
    if tokenizer.chat_template is None:
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        return target_ids + [tokenizer.eos_token_id]

    prompt_text = _render_prompt(input_text, tokenizer)
    messages = [
        {"role": "user", "content": input_text},
        {"role": "assistant", "content": target},
    ]
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the prompt differently with and without the assistant "
            "turn, so the loss mask cannot be placed; use a model whose template appends the "
            "assistant turn after the generation prompt"
        )
    answer_text = full_text[len(prompt_text) :]
    if answer_text.startswith(target):
        target_end = len(target)
    elif target in answer_text:
        target_end = answer_text.find(target) + len(target)
    else:
        raise ValueError("the chat template changes the assistant text, so the target is lost")

    content_ids = tokenizer(answer_text[:target_end], add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(answer_text[target_end:], add_special_tokens=False)["input_ids"]
    special_ids = set(tokenizer.all_special_ids)
    for index, token_id in enumerate(suffix_ids):
        if token_id in special_ids:
            return content_ids + suffix_ids[: index + 1]
    if tokenizer.eos_token_id is None:
        raise ValueError("the chat template ends the assistant turn with no special token")
    return content_ids + [tokenizer.eos_token_id]


def _shorten_input(input_text: str, keep: int) -> str:
    """Keep `keep` characters of the input: the first quarter from its start, the rest from its end.

    The start usually contains the instruction and the end the question and answer options, so
    the middle (a long passage or dialogue) is what is cut.
    """
    if keep >= len(input_text):
        return input_text
    head = keep // 4
    tail = keep - head
    return input_text[:head] + input_text[len(input_text) - tail :]


def _fit_prompt(input_text: str, tokenizer, budget: int) -> tuple[list[int], bool]:
    """Tokenize the prompt, cutting input characters until it has at most `budget` tokens."""
    prompt_ids = _tokenize_prompt(input_text, tokenizer)
    if len(prompt_ids) <= budget:
        return prompt_ids, False
    template_length = len(_tokenize_prompt("", tokenizer))
    if template_length > budget:
        raise ValueError(
            f"the prompt template alone needs {template_length} tokens, more than the "
            f"{budget} left for the prompt; raise max_length"
        )

    # Characters, not tokens, are cut so that multi-byte (Chinese) text is never split inside a
    # character. Each round scales the kept length by the ratio of allowed to current input
    # tokens. Token boundaries shift at the cut, so a few rounds may be needed.
    keep = len(input_text)
    while len(prompt_ids) > budget:
        input_tokens = max(1, len(prompt_ids) - template_length)
        keep = min(keep - 1, keep * (budget - template_length) // input_tokens)
        prompt_ids = _tokenize_prompt(_shorten_input(input_text, max(keep, 0)), tokenizer)
    return prompt_ids, True


def encode_prompt(input_text: str, tokenizer, max_length: int = 512) -> list[int]:
    """Return the prompt ids (user turn plus generation prompt) that generation starts from.

    An over-long input is cut in the middle so that the prompt has at most `max_length` tokens.
    """
    prompt_ids, _ = _fit_prompt(input_text, tokenizer, max_length)
    return prompt_ids


def encode_record(record: dict, tokenizer, max_length: int = 512) -> dict:
    """Tokenize one record into input_ids, labels (-100 on the prompt), task_id and truncated.

    The prompt ids equal `encode_prompt(record["input"], ...)`, so training uses the same token
    boundary that generation starts from. When the example exceeds `max_length` tokens the input
    is shortened and the target is kept whole. The prompt keeps at least a quarter of
    `max_length`, or the whole template if longer. A target too long for the rest is cut at its
    end and loses the end-of-turn token. `truncated` is True in both cases.
    """
    if "task_id" not in record:
        raise ValueError(
            f"record {record.get('sample_id')!r} has no task_id; read records with load_split"
        )
    answer_ids = _tokenize_answer(record["input"], record["target"], tokenizer)
    prompt_ids = _tokenize_prompt(record["input"], tokenizer)
    truncated = len(prompt_ids) + len(answer_ids) > max_length
    if truncated:
        # The prompt keeps at least a quarter of max_length, and never less than the template.
        template_length = len(_tokenize_prompt("", tokenizer))
        min_prompt = min(len(prompt_ids), max(max_length // 4, template_length))
        if min_prompt >= max_length:
            raise ValueError(
                f"max_length={max_length} leaves no room for the target after the "
                f"{template_length}-token prompt template; raise max_length"
            )
        answer_ids = answer_ids[: max_length - min_prompt]
        prompt_ids, _ = _fit_prompt(record["input"], tokenizer, max_length - len(answer_ids))
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "task_id": int(record["task_id"]),
        "truncated": truncated,
    }


def encode_records(records: list[dict], tokenizer, max_length: int = 512) -> list[dict]:
    """Encode records with encode_record and log how many were truncated, per task."""
    examples = []
    truncated_per_task = {}
    for record in tqdm(records, desc="tokenize", unit="rec", disable=len(records) < 1000):
        example = encode_record(record, tokenizer, max_length)
        if example["truncated"]:
            name = record["task_dataset"]
            truncated_per_task[name] = truncated_per_task.get(name, 0) + 1
        examples.append(example)

    if truncated_per_task:
        per_task = ", ".join(f"{name}={n}" for name, n in sorted(truncated_per_task.items()))
        logger.warning(
            "truncated %d of %d examples to max_length=%d (%s)",
            sum(truncated_per_task.values()),
            len(records),
            max_length,
            per_task,
        )
    return examples


def collate(examples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad encoded examples to the longest one and stack them into tensors.

    Returns input_ids and attention_mask (B, T), labels (B, T) with -100 on padding when every
    example has labels, and task_ids (B,).
    """
    import torch

    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token before collating")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not examples:
        raise ValueError("cannot collate an empty list of examples")

    max_len = max(len(example["input_ids"]) for example in examples)
    with_labels = all("labels" in example for example in examples)
    input_ids, attention_mask, labels = [], [], []
    for example in examples:
        ids = list(example["input_ids"])
        pad = max_len - len(ids)
        mask = [1] * len(ids)
        if padding_side == "right":
            input_ids.append(ids + [pad_token_id] * pad)
            attention_mask.append(mask + [0] * pad)
        else:
            input_ids.append([pad_token_id] * pad + ids)
            attention_mask.append([0] * pad + mask)
        if with_labels:
            example_labels = list(example["labels"])
            padding = [IGNORE_INDEX] * pad
            if padding_side == "right":
                labels.append(example_labels + padding)
            else:
                labels.append(padding + example_labels)

    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),  # (B, T)
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),  # (B, T)
        "task_ids": torch.tensor([int(e["task_id"]) for e in examples], dtype=torch.long),  # (B,)
    }
    if with_labels:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)  # (B, T)
    return batch


# -----------------------------------------------------------------------------
# task selection, de-duplication and per-task splits


@dataclass
class TaskStats:
    read: int = 0  # records read for the task, from every source
    duplicates: int = 0  # records dropped because an earlier one has the same input and target
    empty_targets: int = 0  # records dropped because their target is empty


def select_tasks(present: list[str], requested: list[str]) -> list[str]:
    """Resolve --tasks (names or the preset "paper") against the tasks present in the sources."""
    if not requested:
        return sorted(present)
    names = []
    for name in requested:
        for task in PAPER_TASKS if name == "paper" else [name]:
            if task not in names:
                names.append(task)
    missing = [name for name in names if name not in present]
    if missing:
        raise ValueError(
            f"task(s) {', '.join(missing)} not found in the sources; "
            f"tasks present: {', '.join(sorted(present))}"
        )
    return sorted(names)


def _split_sizes(n: int, fractions: tuple[float, float, float], needed: list[str], task: str):
    """Return {split: size} for a task of n records; every needed split gets at least one."""
    sizes = {split: 0 for split in SPLITS}
    for split, fraction in zip(SPLITS[1:], fractions[1:], strict=True):
        if split in needed:
            sizes[split] = max(1, round(n * fraction))
    sizes["train"] = n - sizes["dev"] - sizes["test"]
    if sizes["train"] < 1:
        raise ValueError(
            f"task {task} has {n} usable record{'s' if n != 1 else ''}, too few for a "
            f"train/{'/'.join(needed)} split with at least one record each; add records or pass "
            "--dev/--test files"
        )
    return sizes


def split_records(
    pools: dict[str, list[dict]],
    task_names: list[str],
    fractions: tuple[float, float, float],
    seed: int,
    caps: dict[str, int | None],
) -> tuple[dict[str, list[dict]], dict[str, TaskStats]]:
    """Filter, de-duplicate and split records per task.

    `pools` maps "train", "dev" and "test" to the records read for them. The dev and test pools
    are non-empty only when --dev/--test files were given. A split whose pool is empty is cut
    from the train pool instead. Records with an empty target are dropped. Records with the
    same task, input and target are kept once: test files win over dev files and dev files over
    the train pool, so given evaluation files stay whole and never overlap training. Each task
    is shuffled with its own seed, so adding a task never changes another task's split.
    """
    selected = set(task_names)
    stats = {name: TaskStats() for name in task_names}
    seen = set()
    unique_records = {split: {name: [] for name in task_names} for split in SPLITS}
    for split in ("test", "dev", "train"):
        for record in pools[split]:
            name = record["task_dataset"]
            if name not in selected:
                continue
            stats[name].read += 1
            if not record["target"].strip():
                stats[name].empty_targets += 1
                continue
            key = (name, record["input"], record["target"])
            if key in seen:
                stats[name].duplicates += 1
                continue
            seen.add(key)
            unique_records[split][name].append(record)

    splits = {split: [] for split in SPLITS}
    for name in task_names:
        rng = random.Random(f"{seed}:{name}")
        supplied = {split: unique_records[split][name] for split in ("dev", "test")}
        for split in ("dev", "test"):
            rng.shuffle(supplied[split])
        train_pool = unique_records["train"][name]
        rng.shuffle(train_pool)

        for split in ("dev", "test"):
            if pools[split] and not supplied[split]:
                logger.warning("task %s has no labelled records in the --%s files", name, split)
        needed = [split for split in ("dev", "test") if not pools[split]]
        sizes = _split_sizes(len(train_pool), fractions, needed, name)
        parts = {
            "dev": supplied["dev"] if pools["dev"] else train_pool[: sizes["dev"]],
            "test": (
                supplied["test"]
                if pools["test"]
                else train_pool[sizes["dev"] : sizes["dev"] + sizes["test"]]
            ),
            "train": train_pool[sizes["dev"] + sizes["test"] :],
        }
        for split in SPLITS:
            part = parts[split]
            if caps[split] is not None:
                part = part[: caps[split]]
            splits[split].extend(part)
    return splits, stats


def build_registry(
    splits: dict[str, list[dict]], task_names: list[str], stats: dict[str, TaskStats]
) -> list[dict]:
    """Build the tasks.json entries; ids follow the sorted task names."""
    tasks = []
    for task_id, name in enumerate(sorted(task_names)):
        records = [r for split in SPLITS for r in splits[split] if r["task_dataset"] == name]
        task_types = sorted({r["task_type"] for r in records})
        assert len(task_types) == 1, f"task {name} mixes task types {task_types}"

        choices = []
        for record in records:
            for choice in record["answer_choices"] or []:
                if choice not in choices:
                    choices.append(choice)
        choices_or_none = choices if 0 < len(choices) <= MAX_REGISTRY_CHOICES else None
        train_targets = [r["target"] for r in splits["train"] if r["task_dataset"] == name]
        tasks.append(
            {
                "name": name,
                "id": task_id,
                "task_type": task_types[0],
                "metric": task_metric(name, task_types[0]),
                "answer_choices": choices_or_none,
                "counts": {
                    split: sum(r["task_dataset"] == name for r in splits[split]) for split in SPLITS
                },
                "max_target_chars": max(len(target) for target in train_targets),
                "source_counts": {
                    "read": stats[name].read,
                    "duplicates": stats[name].duplicates,
                    "empty_targets": stats[name].empty_targets,
                },
            }
        )
    return tasks


def _write_atomic(path: Path, text: str) -> None:
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp_path, path)


def write_prepared(out_dir: str | Path, splits: dict[str, list[dict]], tasks: list[dict]) -> None:
    """Write the split files and tasks.json; tasks.json goes last and marks the directory done.

    Each file is written under a temporary name and renamed. A stale tasks.json is removed
    first, so an interrupted run leaves a directory that load_tasks rejects.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tasks.json").unlink(missing_ok=True)

    order = {task["name"]: task["id"] for task in tasks}
    for split in SPLITS:
        records = sorted(splits[split], key=lambda r: order[r["task_dataset"]])
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        _write_atomic(out_dir / f"{split}.jsonl", "".join(lines))
    _write_atomic(out_dir / "tasks.json", json.dumps(tasks, ensure_ascii=False, indent=1) + "\n")


def format_count_table(tasks: list[dict]) -> str:
    """Return the per-task table of record counts printed after a run."""
    header = ("id", "task", "type", "read", "duplicates", "empty", "train", "dev", "test")
    rows = []
    for task in tasks:
        source, counts = task["source_counts"], task["counts"]
        rows.append(
            (
                task["id"],
                task["name"],
                task["task_type"],
                source["read"],
                source["duplicates"],
                source["empty_targets"],
                counts["train"],
                counts["dev"],
                counts["test"],
            )
        )
    totals = ["", "total", ""] + [sum(row[i] for row in rows) for i in range(3, len(header))]
    rows.append(tuple(totals))
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = []
    for row in [header] + rows:
        cells = [
            str(cell).ljust(width) if i in (1, 2) else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _check_task_type(record: dict, path: Path, line_no: int, task_types: dict) -> None:
    """Raise ValueError when a task's records disagree on its task type."""
    name = record["task_dataset"]
    first = task_types.setdefault(name, (record["task_type"], path, line_no))
    if record["task_type"] != first[0]:
        raise _field_error(
            path,
            line_no,
            "task_type",
            f"task {name} has type {record['task_type']!r} here but {first[0]!r} at "
            f"{first[1]}:{first[2]}; a task needs one task type",
        )


def prepare(config: PrepConfig) -> list[dict]:
    """Read, split and write one prepared data directory; return its task registry."""
    if len(config.split) != 3 or any(f < 0 for f in config.split):
        raise ValueError(f"--split needs three non-negative fractions, got {config.split}")
    if abs(sum(config.split) - 1.0) > 1e-6:
        raise ValueError(f"--split fractions must sum to 1, got {config.split}")

    pools = {}
    if config.sources:
        task_types = {}  # task name -> (task type, file, line) of its first record
        for split, paths in (("train", config.sources), ("dev", config.dev), ("test", config.test)):
            pools[split] = []
            for path in find_task_files(paths) if paths else []:
                for record, line_no in read_records(path):
                    _check_task_type(record, path, line_no, task_types)
                    pools[split].append(record)
    else:
        if config.dev or config.test:
            raise ValueError("--dev and --test need --source; the demo set is split internally")
        pools = {"train": build_demo_records(config.seed), "dev": [], "test": []}

    present = sorted({r["task_dataset"] for split in SPLITS for r in pools[split]})
    task_names = select_tasks(present, config.tasks)
    caps = {
        "train": config.max_per_task,
        "dev": config.max_dev_per_task,
        "test": config.max_test_per_task,
    }
    splits, stats = split_records(pools, task_names, config.split, config.seed, caps)
    for name in task_names:
        if not any(r["task_dataset"] == name for r in splits["train"]):
            raise ValueError(f"task {name} has no training records with a non-empty target")

    tasks = build_registry(splits, task_names, stats)
    write_prepared(config.out, splits, tasks)
    return tasks


# -----------------------------------------------------------------------------
# the embedded demo set
#
# The facts are textbook associations (typical symptoms, treating department, common first-line
# drugs) written for this demo. They give it realistic structure and are not clinical guidance.
# Names contain no ",", ";", "(" or ")", so the answer formats above parse unambiguously.


@dataclass(frozen=True)
class Condition:
    name: str  # standard disease name
    symptoms: tuple[str, ...]  # typical presenting symptoms
    department: str  # the department that usually treats it
    drugs: tuple[str, ...]  # common first-line drugs


CONDITIONS = (
    Condition("hypertension", ("headache", "dizziness", "blurred vision"), "cardiology",
              ("lisinopril", "amlodipine")),
    Condition("heart failure", ("ankle swelling", "breathlessness when lying flat", "fatigue"),
              "cardiology", ("furosemide", "ramipril")),
    Condition("type 2 diabetes", ("increased thirst", "frequent urination", "fatigue"),
              "endocrinology", ("metformin",)),
    Condition("hypothyroidism", ("weight gain", "cold intolerance", "constipation", "fatigue"),
              "endocrinology", ("levothyroxine",)),
    Condition("asthma", ("wheezing", "chest tightness", "night-time cough"), "pulmonology",
              ("salbutamol", "budesonide")),
    Condition("pneumonia", ("fever", "productive cough", "pleuritic chest pain"), "pulmonology",
              ("amoxicillin",)),
    Condition("migraine", ("throbbing headache", "nausea", "sensitivity to light"), "neurology",
              ("sumatriptan", "ibuprofen")),
    Condition("epilepsy", ("seizures", "brief loss of awareness"), "neurology",
              ("levetiracetam", "lamotrigine")),
    Condition("gastroesophageal reflux disease", ("heartburn", "regurgitation", "sour taste"),
              "gastroenterology", ("omeprazole",)),
    Condition("peptic ulcer disease", ("burning stomach pain", "bloating", "black stools"),
              "gastroenterology", ("omeprazole", "lansoprazole")),
    Condition("urinary tract infection", ("painful urination", "urinary urgency",
              "lower abdominal pain"), "urology", ("nitrofurantoin", "trimethoprim")),
    Condition("kidney stones", ("severe flank pain", "blood in the urine", "vomiting"),
              "urology", ("diclofenac", "tamsulosin")),
    Condition("atopic dermatitis", ("itchy skin", "dry skin", "red rash"), "dermatology",
              ("hydrocortisone cream", "emollients")),
    Condition("psoriasis", ("scaly plaques", "nail pitting", "itchy skin"), "dermatology",
              ("calcipotriol", "betamethasone cream")),
    Condition("major depressive disorder", ("low mood", "loss of interest", "early waking"),
              "psychiatry", ("sertraline", "fluoxetine")),
    Condition("generalized anxiety disorder", ("excessive worry", "restlessness",
              "muscle tension"), "psychiatry", ("sertraline", "escitalopram")),
    Condition("osteoarthritis", ("knee pain", "morning stiffness", "reduced range of motion"),
              "orthopedics", ("paracetamol", "ibuprofen")),
    Condition("gout", ("sudden joint pain", "swollen big toe", "red hot joint"), "rheumatology",
              ("colchicine", "naproxen")),
    Condition("iron deficiency anemia", ("pale skin", "breathlessness on exertion",
              "brittle nails"), "hematology", ("ferrous sulfate",)),
    Condition("acute otitis media", ("ear pain", "reduced hearing", "fever"), "otolaryngology",
              ("amoxicillin",)),
    Condition("allergic rhinitis", ("sneezing", "runny nose", "itchy eyes"), "otolaryngology",
              ("cetirizine", "fluticasone nasal spray")),
    Condition("bacterial conjunctivitis", ("red eye", "sticky eye discharge", "gritty eyes"),
              "ophthalmology", ("chloramphenicol eye drops",)),
    Condition("open-angle glaucoma", ("gradual loss of side vision", "halos around lights"),
              "ophthalmology", ("latanoprost", "timolol")),
)  # fmt: skip

DEPARTMENTS = tuple(sorted({condition.department for condition in CONDITIONS}))

# Lay terms patients use, with the standard term a coder would record.
LAY_TERMS = (
    ("high blood pressure", "hypertension"),
    ("sugar diabetes", "diabetes mellitus"),
    ("high blood sugar", "hyperglycemia"),
    ("heart attack", "myocardial infarction"),
    ("mini-stroke", "transient ischemic attack"),
    ("underactive thyroid", "hypothyroidism"),
    ("overactive thyroid", "hyperthyroidism"),
    ("acid reflux", "gastroesophageal reflux disease"),
    ("stomach flu", "gastroenteritis"),
    ("kidney stones", "nephrolithiasis"),
    ("gallstones", "cholelithiasis"),
    ("bladder infection", "cystitis"),
    ("ear infection", "otitis media"),
    ("hay fever", "allergic rhinitis"),
    ("pink eye", "conjunctivitis"),
    ("eczema", "atopic dermatitis"),
    ("hives", "urticaria"),
    ("shingles", "herpes zoster"),
    ("cold sore", "herpes labialis"),
    ("athlete's foot", "tinea pedis"),
    ("chickenpox", "varicella"),
    ("whooping cough", "pertussis"),
    ("nosebleed", "epistaxis"),
    ("fainting spell", "syncope"),
    ("brittle bones", "osteoporosis"),
    ("slipped disc", "intervertebral disc herniation"),
    ("collapsed lung", "pneumothorax"),
    ("low iron", "iron deficiency anemia"),
    ("water on the knee", "knee effusion"),
    ("blood clot in the leg", "deep vein thrombosis"),
    ("lazy eye", "amblyopia"),
    ("pins and needles", "paresthesia"),
)

# Demo task name -> (task type, records generated before de-duplication and splitting). The
# sizes differ by more than 10x on purpose: task imbalance is what MOELoRA's gate addresses.
DEMO_TASKS = {
    "triage": ("cls", 700),
    "clinical_ner": ("ner", 360),
    "term_normalization": ("normalization", 180),
    "drug_relations": ("spo_generation", 120),
    "visit_report": ("report_generation", 60),
}

NER_TYPES = ("disease", "symptom", "drug")
RELATIONS = ("treats", "has symptom")


def _join_words(items: list[str]) -> str:
    """Join ["a", "b", "c"] as "a, b and c"."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _age_and_sex(rng: random.Random) -> str:
    return f"{rng.randint(18, 85)}-year-old {rng.choice(['man', 'woman'])}"


def _triage_pairs() -> list[tuple[tuple[str, str], str]]:
    """Return symptom pairs that point to exactly one department, with that department."""
    pairs = {}
    for condition in CONDITIONS:
        for i, first in enumerate(condition.symptoms):
            for second in condition.symptoms[i + 1 :]:
                departments = {
                    c.department for c in CONDITIONS if first in c.symptoms and second in c.symptoms
                }
                if len(departments) == 1:
                    pairs[(first, second)] = condition.department
    return sorted(pairs.items())


def _demo_triage(rng: random.Random, pairs) -> tuple[str, str, list[str]]:
    (first, second), department = rng.choice(pairs)
    if rng.random() < 0.5:
        first, second = second, first
    opening = rng.choice(
        [
            f"A {_age_and_sex(rng)} reports {first} and {second}.",
            f"Patient complains of {first} and {second} for {rng.randint(2, 30)} days.",
            f"I have had {first} and {second} since last week.",
            f"Main symptoms: {first}, {second}.",
        ]
    )
    question = rng.choice(
        [
            "Which department should the patient visit?",
            "Which clinic should handle this case?",
            "Triage this patient to a department.",
        ]
    )
    text = f"{opening}\n{question}\nOptions: {', '.join(DEPARTMENTS)}\nAnswer:"
    return text, department, list(DEPARTMENTS)


def _entity_answer(sentence: str, entities: dict[str, list[str]]) -> str:
    parts = []
    for entity_type in NER_TYPES:
        found = sorted(set(entities.get(entity_type, [])), key=sentence.find)
        if found:
            parts.append(f"{entity_type}: {', '.join(found)}")
    return "Entities: " + "; ".join(parts) if parts else "Entities: none"


def _demo_ner(rng: random.Random) -> tuple[str, str, list[str]]:
    condition = rng.choice(CONDITIONS)
    symptoms = rng.sample(condition.symptoms, k=rng.randint(1, min(3, len(condition.symptoms))))
    drug = rng.choice(condition.drugs)
    patient = _age_and_sex(rng)
    days = rng.randint(2, 21)
    choice = rng.randrange(6)
    if choice == 0:
        sentence = f"A {patient} with known {condition.name} reports {_join_words(symptoms)}."
        entities = {"disease": [condition.name], "symptom": symptoms}
    elif choice == 1:
        sentence = (
            f"History of {condition.name}, treated with {drug}. "
            f"Now presents with {_join_words(symptoms)}."
        )
        entities = {"disease": [condition.name], "symptom": symptoms, "drug": [drug]}
    elif choice == 2:
        sentence = f"The {patient} has had {_join_words(symptoms)} for {days} days."
        entities = {"symptom": symptoms}
    elif choice == 3:
        sentence = f"Started on {drug} for {condition.name} {days} days ago; no new complaints."
        entities = {"disease": [condition.name], "drug": [drug]}
    elif choice == 4:
        sentence = f"The {patient} takes {drug} daily and denies {_join_words(symptoms)}."
        entities = {"symptom": symptoms, "drug": [drug]}
    else:
        sentence = rng.choice(
            [
                f"The {patient} attends a routine check-up {days} days after a normal visit.",
                f"Follow-up booked in {days} days; the {patient} feels well.",
                f"The {patient} asks about vaccination before travelling in {days} days.",
            ]
        )
        entities = {}
    text = (
        f"Extract the entities from the sentence.\nSentence: {sentence}\n"
        f"Entity types: {', '.join(NER_TYPES)}\nAnswer:"
    )
    return text, _entity_answer(sentence, entities), list(NER_TYPES)


def _demo_normalization(rng: random.Random) -> tuple[str, str, list[str]]:
    picked = rng.sample(LAY_TERMS, k=rng.choice([1, 1, 2]))
    lay = [term for term, _ in picked]
    standard = [term for _, term in picked]
    distractors = rng.sample([t for _, t in LAY_TERMS if t not in standard], k=4 - len(picked))
    candidates = standard + distractors
    rng.shuffle(candidates)
    wording = rng.choice(
        [
            f"my doctor says I have {' and '.join(lay)}",
            f"worried about {' and '.join(lay)}",
            f"history of {' and '.join(lay)}",
            f"{' and '.join(lay)} again",
        ]
    )
    text = (
        f'Patient wording: "{wording}"\nCandidate standard terms: {", ".join(candidates)}\n'
        "Which standard terms match the wording?\nAnswer:"
    )
    return text, "; ".join(standard), candidates


def _demo_relations(rng: random.Random) -> tuple[str, str, list[str]]:
    condition = rng.choice(CONDITIONS)
    drug = rng.choice(condition.drugs)
    symptoms = rng.sample(condition.symptoms, k=2)
    disease = condition.name
    choice = rng.randrange(5)
    if choice == 0:
        sentence = rng.choice(
            [
                f"In most guidelines {drug} is a first-line treatment for {disease}.",
                f"For {disease} doctors usually prescribe {drug}.",
            ]
        )
        triples = [(drug, "treats", disease)]
    elif choice == 1:
        sentence = f"Patients with {disease} often report {symptoms[0]} and {symptoms[1]}."
        triples = [(disease, "has symptom", s) for s in symptoms]
    elif choice == 2:
        sentence = f"Typical {disease} causes {symptoms[0]} and responds to {drug}."
        triples = [(disease, "has symptom", symptoms[0]), (drug, "treats", disease)]
    elif choice == 3:
        sentence = (
            f"A common sign of {disease} is {symptoms[0]}; "
            f"{symptoms[1]} also occurs, and {drug} is often prescribed for it."
        )
        triples = [(disease, "has symptom", s) for s in symptoms] + [(drug, "treats", disease)]
    else:
        sentence = rng.choice(
            [
                f"The pharmacy keeps {drug} in stock at room temperature.",
                f"Store {drug} away from children and check the expiry date.",
                f"The patient asked whether {drug} is available as a generic.",
            ]
        )
        triples = []
    text = (
        f"Find the relation triples in the sentence.\nSentence: {sentence}\n"
        f"Relations: {', '.join(RELATIONS)}\nAnswer:"
    )
    if not triples:
        return text, "Triples: none", list(RELATIONS)
    answer = "Triples: " + "; ".join(f"({h}, {r}, {t})" for h, r, t in triples)
    return text, answer, list(RELATIONS)


def _demo_report(rng: random.Random) -> tuple[str, str, None]:
    condition = rng.choice(CONDITIONS)
    symptoms = rng.sample(condition.symptoms, k=2)
    drug = rng.choice(condition.drugs)
    days = rng.randint(2, 30)
    question, replies = rng.choice(
        [
            ("Any other problems?", ["No, nothing else.", "I also feel tired."]),
            ("Have you taken anything for it?", ["Not yet.", "Only some painkillers."]),
            ("Is it getting worse?", ["A little worse each day.", "It stays the same."]),
        ]
    )
    reply = rng.choice(replies)
    complaint = f"{symptoms[0]} and {symptoms[1]} for {days} days"
    text = (
        "Write a short visit report for this dialogue.\n"
        f"Patient: I have had {complaint}.\nDoctor: {question}\nPatient: {reply}\n"
        f"Doctor: This looks like {condition.name}. I suggest {drug} and a visit to "
        f"{condition.department}.\nAnswer:"
    )
    target = (
        f"Chief complaint: {complaint.capitalize()}.\nDiagnosis: {condition.name}.\n"
        f"Suggestion: {drug.capitalize()} and follow-up in {condition.department}."
    )
    return text, target, None


def build_demo_records(seed: int = 0) -> list[dict]:
    """Generate the demo records (unique within each task), deterministically from `seed`."""
    rng = random.Random(seed)
    pairs = _triage_pairs()
    generators = {
        "triage": lambda: _demo_triage(rng, pairs),
        "clinical_ner": lambda: _demo_ner(rng),
        "term_normalization": lambda: _demo_normalization(rng),
        "drug_relations": lambda: _demo_relations(rng),
        "visit_report": lambda: _demo_report(rng),
    }
    records = []
    for name, (task_type, size) in DEMO_TASKS.items():
        seen = set()
        attempts = 0
        while len(seen) < size:
            attempts += 1
            assert attempts < 50 * size, f"demo task {name} cannot reach {size} unique records"
            text, target, choices = generators[name]()
            if (text, target) in seen:
                continue
            seen.add((text, target))
            records.append(
                {
                    "input": text,
                    "target": target,
                    "task_dataset": name,
                    "task_type": task_type,
                    "answer_choices": choices,
                    "sample_id": f"{name}-{len(seen)}",
                }
            )
    return records


# -----------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> PrepConfig:
    defaults = PrepConfig()
    parser = argparse.ArgumentParser(
        description="Prepare a MOELoRA data directory from PromptCBLUE-format task files, "
        "or write the embedded English demo set when no --source is given."
    )

    # Inputs and output.
    parser.add_argument(
        "--source",
        nargs="+",
        default=[],
        help="task files or folders (every *.json/*.jsonl inside) to split per task",
    )
    parser.add_argument("--dev", nargs="+", default=[], help="files used whole as the dev split")
    parser.add_argument("--test", nargs="+", default=[], help="files used whole as the test split")
    parser.add_argument("--out", default=defaults.out, help="output directory (default: data)")

    # Selection and splitting.
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        help=f"task names to keep, or 'paper' for {', '.join(PAPER_TASKS)} (default: all)",
    )
    parser.add_argument("--max-per-task", type=int, help="cap on training records per task")
    parser.add_argument("--max-dev-per-task", type=int, help="cap on dev records per task")
    parser.add_argument("--max-test-per-task", type=int, help="cap on test records per task")
    parser.add_argument(
        "--split",
        nargs=3,
        type=float,
        default=list(defaults.split),
        metavar=("TRAIN", "DEV", "TEST"),
        help="fractions of each task's records per split (default: 0.8 0.1 0.1)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="shuffle and demo seed")
    args = parser.parse_args(argv)

    for flag in ("max_per_task", "max_dev_per_task", "max_test_per_task"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    return PrepConfig(
        sources=args.source,
        dev=args.dev,
        test=args.test,
        out=args.out,
        tasks=args.tasks,
        max_per_task=args.max_per_task,
        max_dev_per_task=args.max_dev_per_task,
        max_test_per_task=args.max_test_per_task,
        split=tuple(args.split),
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    try:
        tasks = prepare(config)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_count_table(tasks))
    print(f"wrote {Path(config.out) / 'tasks.json'} and {', '.join(s + '.jsonl' for s in SPLITS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
