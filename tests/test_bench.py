"""bench.py on the tiny random model: the report's shape, not its timings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Run `bench.py --tiny` once with one timed round and return (stdout, JSON results)."""
    json_path = tmp_path_factory.mktemp("bench") / "results.json"
    command = [
        sys.executable,
        str(REPO / "bench.py"),
        "--tiny",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--gen-repeats",
        "1",
        "--memory-steps",
        "1",
        "--json",
        str(json_path),
    ]
    completed = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout, json.loads(json_path.read_text(encoding="utf-8"))


def _table(stdout: str, first_header: str) -> list[list[str]]:
    """Return the cells of the Markdown table whose first header cell is `first_header`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_training_table_has_row_per_variant(tiny_run):
    stdout, _ = tiny_run
    table = _table(stdout, "variant")
    assert table[0] == [header for header, _, _ in bench.TRAIN_COLUMNS]
    assert set(table[1]) == {"---"}
    assert [row[0] for row in table[2:]] == list(bench.VARIANTS)
    for row in table[2:]:
        assert len(row) == len(bench.TRAIN_COLUMNS), row


def test_training_table_ratios_are_self_consistent(tiny_run):
    stdout, _ = tiny_run
    rows = {row[0]: row for row in _table(stdout, "variant")[2:]}
    headers = [header for header, _, _ in bench.TRAIN_COLUMNS]
    vs_peft = headers.index("time / peft-lora")
    vs_floor = headers.index("time / floor")
    assert rows["peft-lora"][vs_peft] == "1.00"
    assert rows["floor"][vs_floor] == "1.00"


def test_generation_table_has_three_rows(tiny_run):
    stdout, _ = tiny_run
    table = _table(stdout, "generation")
    assert len(table[0]) == len(bench.GENERATION_COLUMNS)
    assert [row[0] for row in table[2:]] == list(bench.GENERATION_VARIANTS)
    assert table[2][-1] == "1.000"


def test_targets_table_lists_all_eight(tiny_run):
    stdout, results = tiny_run
    table = _table(stdout, "target")
    assert len(table) == 2 + 8
    assert {row[-1] for row in table[2:]} <= {"met", "missed"}
    assert len(results["targets"]) == 8


def test_trainable_params_match_lora_rank(tiny_run):
    _, results = tiny_run
    params = {row["variant"]: row["trainable_params"] for row in results["train"]}
    assert params["floor"] == 0
    # Experts split the rank, so every adapter has one rank-16 LoRA's parameters
    # plus its gate: the task embedding table and W_g, or a router per layer.
    lora_only = params["peft-lora"]
    assert lora_only > 0
    gate = 8 * 64 + 64 * 8
    assert params["lora"] == lora_only + 8 * 64 + 64 * 1
    assert params["moelora"] == lora_only + gate
    assert params["moelora-loop"] == lora_only + gate
    assert params["moelora-16x1"] == lora_only + 8 * 64 + 64 * 16
    assert params["molora"] > lora_only


def test_json_records_repeats_and_memory(tiny_run):
    _, results = tiny_run
    for kind in ("train", "generation"):
        for name, seconds in results["raw_seconds"][kind].items():
            assert len(seconds) == 1, name
    for row in results["train"]:
        assert row["peak_mib"] > 0, row["variant"]
        assert row["median_s"] > 0, row["variant"]


def test_loop_layer_matches_fused_layer():
    """The per-expert loop and moelora.py's fused layer compute the same output."""
    import torch

    from moelora import MoELoRAConfig, MoELoRAModel
    from tests.conftest import make_tiny_model

    config = bench.BenchConfig(dropout=0.0, num_tasks=3)
    fused = MoELoRAModel(
        make_tiny_model(),
        MoELoRAConfig(num_tasks=3, num_experts=8, rank=16, dropout=0.0),
    )
    loop = bench.LoopMoELoRAModel(make_tiny_model(), config, num_tasks=3)

    # Copy the fused weights into the loop's per-expert pairs: A_i = rows, B_i = columns.
    torch.manual_seed(1)
    with torch.no_grad():
        fused.gate.task_embedding.weight.normal_()
        fused.gate.proj.weight.normal_()
        loop.task_embedding.weight.copy_(fused.gate.task_embedding.weight)
        loop.gate.weight.copy_(fused.gate.proj.weight)
        fused_layers = list(fused.adapted_layers().values())
        assert len(fused_layers) == len(loop.layers)
        for fused_layer, loop_layer in zip(fused_layers, loop.layers, strict=True):
            fused_layer.lora_B.normal_()
            for i in range(8):
                rows = slice(2 * i, 2 * i + 2)
                loop_layer.lora_A[i].weight.copy_(fused_layer.lora_A[rows])
                loop_layer.lora_B[i].weight.copy_(fused_layer.lora_B[:, rows])

    input_ids = torch.randint(0, 1000, (3, 10))
    mask = torch.ones_like(input_ids)
    task_ids = torch.tensor([0, 1, 2])
    fused.eval()
    loop.eval()
    with torch.no_grad():
        fused_logits = fused(input_ids=input_ids, attention_mask=mask, task_ids=task_ids).logits
        loop_logits = loop(input_ids, mask, None, task_ids).logits
    torch.testing.assert_close(loop_logits, fused_logits, rtol=1e-4, atol=1e-5)
