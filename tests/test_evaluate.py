"""Tests for evaluate.py: answer parsing, metrics against hand-computed scores, generation."""

import json
import math
from collections import defaultdict

import pytest
from conftest import PROMPTCBLUE

import evaluate
from evaluate import (
    CharWordTokenizer,
    classification_scores,
    extraction_scores,
    parse_answer,
    report_rouge_scores,
    rouge_scores,
    score_task,
)

TOY = PROMPTCBLUE / "toy"


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def canonical(value):
    """Order-free form of a structured answer: lists become sorted tuples of unique items."""
    if isinstance(value, dict):
        return tuple(sorted((key, canonical(item)) for key, item in value.items()))
    if isinstance(value, list):
        return tuple(sorted({canonical(item) for item in value}, key=repr))
    return value


@pytest.fixture(scope="module")
def toy_dev():
    return read_jsonl(TOY / "dev.json")


# -----------------------------------------------------------------------------
# parsing


def test_parser_reproduces_dev_structured(toy_dev):
    with open(TOY / "dev_structured.json", encoding="utf-8") as f:
        structured = json.load(f)
    by_id = {record["sample_id"]: record for record in toy_dev}
    matched, mismatches = 0, []
    for task, answers in structured.items():
        for expected in answers:
            record = by_id[expected["sample_id"]]
            parsed = parse_answer(record["target"], record["task_type"], record["answer_choices"])
            if canonical(parsed) == canonical(expected["answer"]):
                matched += 1
            else:
                mismatches.append((task, expected["sample_id"], parsed, expected["answer"]))
    assert mismatches == []
    assert matched == 80


def test_parse_ner_ignores_types_outside_choices():
    text = "上述句子中的实体包含：\n药物实体：阿司匹林，布洛芬\n疾病实体：发热\n"
    parsed = parse_answer(text, "ner", ["药物"])
    assert parsed == [
        {"entity": "阿司匹林", "type": "药物"},
        {"entity": "布洛芬", "type": "药物"},
    ]


def test_parse_normalization_keeps_choices_only():
    parsed = parse_answer("咳嗽，肺炎，咳嗽", "normalization", ["咳嗽", "哮喘"])
    assert parsed == [{"entity": "咳嗽", "type": "normalization"}]


def test_parse_events_skips_lines_without_fields():
    text = "上述句子中的临床发现事件如下：\n\n主体词：发热；发生状态：否定\n无关的一行"
    parsed = parse_answer(text, "event_extraction")
    assert parsed == [{"主体词": "发热", "发生状态": "否定", "描述词": [], "解剖部位": []}]


def test_parse_report_missing_sections_absent():
    parsed = parse_answer(
        "上述问诊对话的诊疗报告如下：\n主诉：咳嗽\n诊断：感冒", "report_generation"
    )
    assert parsed == {"主诉": "咳嗽", "诊断": "感冒"}


def test_parse_label_takes_first_line():
    assert parse_answer("  就医建议\n多余的文字", "cls") == "就医建议"
    assert parse_answer("", "matching") == ""


# -----------------------------------------------------------------------------
# metrics


def test_micro_f1_hand_computed():
    golds = [[{"entity": "A"}, {"entity": "B"}], [{"entity": "D"}]]
    predictions = [[{"entity": "A"}, {"entity": "C"}], []]
    scores = extraction_scores(golds, predictions)
    # tp = 1, fp = 1, fn = 2: precision 1/2, recall 1/3, F1 = 2 * (1/6) / (5/6) = 0.4
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["micro_f1"] == pytest.approx(0.4)


def test_micro_f1_empty_outputs():
    assert extraction_scores([[], []], [[], []])["micro_f1"] == 1.0
    assert extraction_scores([[]], [[{"entity": "X"}]])["micro_f1"] == 0.0
    assert extraction_scores([[{"entity": "X"}]], [None])["micro_f1"] == 0.0
    # An empty record next to a scored one changes nothing.
    assert extraction_scores([[], [{"entity": "X"}]], [[], [{"entity": "X"}]])["micro_f1"] == 1.0


def test_micro_f1_lists_inside_items_are_sets():
    gold = [[{"主体词": "疼痛", "描述词": ["胀痛", "持续性"]}]]
    prediction = [[{"主体词": "疼痛", "描述词": ["持续性", "胀痛"]}]]
    assert extraction_scores(gold, prediction)["micro_f1"] == 1.0


def test_macro_f1_hand_computed():
    golds = ["a", "a", "b", "c"]
    predictions = ["a", "b", "b", "z"]
    valid = [True, True, True, False]
    scores = classification_scores(golds, predictions, valid)
    # a: P 1, R 1/2, F1 2/3; b: P 1/2, R 1, F1 2/3; c: F1 0; macro = 4/9
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["macro_f1"] == pytest.approx(4 / 9)


def test_answer_outside_choices_counts_wrong():
    task = {"name": "KUAKE-QIC", "task_type": "cls"}
    rows = [
        {"gold": "就医建议", "prediction": "就医建议", "answer_choices": ["治疗方案", "注意事项"]},
        {"gold": "治疗方案", "prediction": "治疗方案", "answer_choices": ["治疗方案", "注意事项"]},
    ]
    scores = score_task(task, rows)
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["primary_metric"] == "macro_f1"
    # 就医建议: tp 0, fn 1 -> F1 0; 治疗方案: F1 1 -> macro 1/2
    assert scores["primary"] == pytest.approx(0.5)


def test_none_label_is_a_valid_answer():
    task = {"name": "CHIP-CTC", "task_type": "cls"}
    rows = [{"gold": "非上述类型", "prediction": "非上述类型", "answer_choices": ["性别"]}]
    assert score_task(task, rows)["accuracy"] == 1.0


def test_tokenizer_splits_chinese_keeps_words():
    tokens = CharWordTokenizer().tokenize("服用Aspirin 100mg后，头痛。")
    assert tokens == ["服", "用", "aspirin", "100mg", "后", "，", "头", "痛", "。"]


def test_rouge_l_english_hand_computed():
    scores = rouge_scores(["the cat sat on the mat"], ["the cat on the mat"])
    # LCS 5 of 6 gold and 5 predicted tokens: P 1, R 5/6, F1 10/11
    assert scores["rouge_l"] == pytest.approx(10 / 11)


def test_rouge_chinese_hand_computed():
    scores = rouge_scores(["患者头痛发热"], ["患者发热"])
    # LCS 4 of 6 gold and 4 predicted characters: P 1, R 2/3, F1 0.8
    assert scores["rouge_l"] == pytest.approx(0.8)
    assert scores["rouge_1"] == pytest.approx(0.8)
    # bigrams 患者, 者头, 头痛, 痛发, 发热 against 患者, 者发, 发热: P 2/3, R 2/5, F1 1/2
    assert scores["rouge_2"] == pytest.approx(0.5)


def test_rouge_mixed_script_words_whole():
    scores = rouge_scores(["服用aspirin后头痛"], ["aspirin头痛"])
    # 6 gold tokens, 3 predicted, LCS 3: P 1, R 1/2, F1 2/3
    assert scores["rouge_l"] == pytest.approx(2 / 3)


def test_rouge_empty_outputs():
    assert rouge_scores([""], [""])["rouge_l"] == 1.0
    assert rouge_scores(["头痛"], [""])["rouge_l"] == 0.0
    assert rouge_scores([""], ["头痛"])["rouge_l"] == 0.0
    assert rouge_scores(["头痛"], [None])["rouge_l"] == 0.0


def test_report_rouge_averages_sections():
    gold = [{"主诉": "头痛", "诊断": "感冒"}]
    prediction = [{"主诉": "头痛"}]
    scores = report_rouge_scores(gold, prediction)
    # 主诉 matches (1.0), 诊断 missing (0.0): mean 0.5
    assert scores["rouge_l"] == pytest.approx(0.5)


def test_gold_scores_one_on_toy_dev(toy_dev):
    by_task = defaultdict(list)
    for record in toy_dev:
        by_task[(record["task_dataset"], record["task_type"])].append(record)
    assert len(by_task) == 16
    for (name, task_type), records in by_task.items():
        rows = []
        for record in records:
            gold = parse_answer(record["target"], task_type, record["answer_choices"])
            prediction = parse_answer(record["target"], task_type, record["answer_choices"])
            rows.append(
                {"gold": gold, "prediction": prediction, "answer_choices": record["answer_choices"]}
            )
        scores = score_task({"name": name, "task_type": task_type}, rows)
        assert scores["primary"] == pytest.approx(1.0), name
        metrics = [value for key, value in scores.items() if isinstance(value, float)]
        assert all(math.isclose(value, 1.0) for value in metrics), (name, scores)


def test_primary_metric_promptcblue_rules():
    assert evaluate.primary_metric({"name": "CHIP-CTC", "task_type": "cls"}) == "macro_f1"
    assert evaluate.primary_metric({"name": "MedDG", "task_type": "response_generation"}) == (
        "rouge_l"
    )
    assert evaluate.primary_metric({"name": "CHIP-STS", "task_type": "cls"}) == "micro_f1"
    assert evaluate.primary_metric({"name": "x", "task_type": "cls", "metric": "accuracy"}) == (
        "accuracy"
    )
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate.primary_metric({"name": "x", "task_type": "cls", "metric": "bleu"})
