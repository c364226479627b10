"""Tests of train.py on a tiny Llama and a small demo data set, on CPU."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file

import train
from data_prep import PrepConfig, prepare

REPO = Path(train.__file__).resolve().parent


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A local Hugging Face folder with the tiny Llama and the sentencepiece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The embedded demo set, capped to 40 training and 8 dev records per task."""
    folder = tmp_path_factory.mktemp("demo")
    prepare(PrepConfig(out=str(folder), max_per_task=40, max_dev_per_task=8, max_test_per_task=8))
    return folder


def tiny_config(tiny_model_dir, demo_dir, out, **overrides) -> train.TrainConfig:
    settings = dict(
        data=str(demo_dir),
        out=str(out),
        model=str(tiny_model_dir),
        device="cpu",
        steps=30,
        batch_size=4,
        max_length=128,
        lr=1e-2,
        warmup_steps=0,
        log_every=5,
        eval_every=0,
        eval_max_per_task=4,
        save_every=0,
    )
    settings.update(overrides)
    return train.TrainConfig(**settings)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def cli_args(config: train.TrainConfig) -> list[str]:
    """Return the command-line flags that parse back into `config`."""
    args = []
    for name, value in vars(config).items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        args += [flag] if value is True else [flag, str(value)]
    return args


# -----------------------------------------------------------------------------
# training on the tiny model


def test_train_loss_decreases_over_30_steps(tiny_model_dir, demo_dir, tmp_path):
    run_dir = tmp_path / "run"
    train.train(tiny_config(tiny_model_dir, demo_dir, run_dir, save_every=10, keep_checkpoints=2))

    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.05

    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30]
    for name, before in evals[0]["dev_loss"].items():
        assert evals[-1]["dev_loss"][name] < before, name

    assert (run_dir / "adapter_model.safetensors").is_file()
    assert (run_dir / "loss.png").stat().st_size > 0
    saved = train.MoELoRAModel.read_adapter_config(run_dir)
    assert saved["task_names"] == [task["name"] for task in train.load_tasks(demo_dir)]
    assert saved["moelora"]["num_experts"] == 8
    assert saved["moelora"]["gate"] == "task"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-20", "step-30"]


def test_train_log_lines_stable_format(tiny_model_dir, demo_dir, tmp_path, capsys):
    train.train(tiny_config(tiny_model_dir, demo_dir, tmp_path / "run", steps=4, log_every=2))

    lines = [line for line in capsys.readouterr().out.splitlines() if " loss=" in line]
    assert len(lines) == 2
    for line, step in zip(lines, (2, 4), strict=True):
        keys = [field.split("=")[0] for field in line.split()]
        assert keys == ["step", "loss", "lr", "tokens_per_s", "grad_norm"]
        assert line.startswith(f"step={step} ")


@pytest.mark.parametrize("method, num_experts, gate", [("lora", 1, "task"), ("molora", 8, "token")])
def test_train_methods_write_their_adapter(
    tiny_model_dir, demo_dir, tmp_path, method, num_experts, gate
):
    run_dir = tmp_path / method
    model = train.train(tiny_config(tiny_model_dir, demo_dir, run_dir, steps=2, method=method))

    saved = train.MoELoRAModel.read_adapter_config(run_dir)
    assert saved["moelora"]["num_experts"] == num_experts
    assert saved["moelora"]["gate"] == gate
    tensors = load_file(run_dir / "adapter_model.safetensors")
    assert set(tensors) == set(model.adapter_state_dict())


def test_lora_and_moelora_same_adapter_size(tiny_model_dir, demo_dir, tmp_path):
    sizes = {}
    for method in ("moelora", "lora"):
        config = tiny_config(tiny_model_dir, demo_dir, tmp_path / method, steps=1, method=method)
        model = train.train(config)
        sizes[method] = sum(
            t.numel() for name, t in model.adapter_state_dict().items() if "lora_" in name
        )
    assert sizes["moelora"] == sizes["lora"]


def test_grad_accum_matches_larger_batch(tiny_model_dir, demo_dir, tmp_path):
    # Without dropout, two micro-batches of 4 are the same step as one batch of 8: the sampler
    # draws the same 8 records and the loss is token-weighted over both micro-batches.
    common = dict(steps=3, lr=1e-3, lora_dropout=0.0, eval_max_per_task=1)
    whole = train.train(
        tiny_config(tiny_model_dir, demo_dir, tmp_path / "whole", batch_size=8, **common)
    )
    split = train.train(
        tiny_config(
            tiny_model_dir, demo_dir, tmp_path / "split", batch_size=4, grad_accum=2, **common
        )
    )
    expected, actual = whole.adapter_state_dict(), split.adapter_state_dict()
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, rtol=0, atol=1e-6), name


# -----------------------------------------------------------------------------
# task sampling


def draw_task_counts(counts: list[int], mode: str, batches: int, batch_size: int) -> list[int]:
    task_ids = [task for task, n in enumerate(counts) for _ in range(n)]
    sampler = train.MixedTaskSampler(task_ids, len(counts), mode, temperature=2.0, seed=0)
    drawn = [0] * len(counts)
    for _ in range(batches):
        for index in sampler.next_batch(batch_size):
            drawn[task_ids[index]] += 1
    return drawn


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("proportional", [400 / 540, 100 / 540, 40 / 540]),
        ("uniform", [1 / 3, 1 / 3, 1 / 3]),
        # n_i^(1/2) = 20, 10, sqrt(40)
        ("temperature", [w / (30 + 40**0.5) for w in (20, 10, 40**0.5)]),
    ],
)
def test_sampler_task_proportions(mode, expected):
    batches, batch_size = 400, 16
    drawn = draw_task_counts([400, 100, 40], mode, batches, batch_size)
    total = batches * batch_size
    for task, p in enumerate(expected):
        # Four standard deviations of a binomial count: fails by chance about once in 15,000.
        tolerance = 4 * math.sqrt(total * p * (1 - p))
        assert abs(drawn[task] - total * p) < tolerance, (task, drawn, expected)


def test_sampler_proportional_covers_each_record_once():
    task_ids = [0] * 30 + [1] * 7 + [2] * 3
    sampler = train.MixedTaskSampler(task_ids, 3, "proportional", temperature=1.0, seed=1)
    first_pass = sampler.next_batch(20) + sampler.next_batch(20)
    assert sorted(first_pass) == list(range(40))


def test_sampler_uniform_skips_empty_task():
    drawn = draw_task_counts([50, 0, 5], "uniform", batches=20, batch_size=10)
    assert drawn[1] == 0
    assert drawn[0] > 0
    assert drawn[2] > 0


def test_sampler_state_dict_continues_order():
    task_ids = [0] * 20 + [1] * 5
    for mode in train.TASK_SAMPLING:
        sampler = train.MixedTaskSampler(task_ids, 2, mode, temperature=2.0, seed=3)
        for _ in range(7):
            sampler.next_batch(6)
        state = sampler.state_dict()
        expected = [sampler.next_batch(6) for _ in range(5)]

        restored = train.MixedTaskSampler(task_ids, 2, mode, temperature=2.0, seed=3)
        restored.load_state_dict(state)
        assert [restored.next_batch(6) for _ in range(5)] == expected, mode


# -----------------------------------------------------------------------------
# checkpoints and resume


def test_kill_and_resume_matches_uninterrupted(tiny_model_dir, demo_dir, tmp_path):
    settings = dict(steps=40, save_every=5, log_every=5, lora_dropout=0.1, lr=3e-3)
    whole = tiny_config(tiny_model_dir, demo_dir, tmp_path / "whole", **settings)
    parts = replace(whole, out=str(tmp_path / "parts"))
    command = [sys.executable, str(REPO / "train.py")]
    # One thread a process: each run is fast even when other jobs share the cores.
    env = dict(os.environ, OMP_NUM_THREADS="1")

    uninterrupted = subprocess.run(
        command + cli_args(whole), capture_output=True, text=True, cwd=REPO, env=env
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    # Kill the second run with SIGKILL right after its first checkpoint appears.
    process = subprocess.Popen(
        command + cli_args(parts),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while not (Path(parts.out) / "checkpoints" / "step-5").is_dir():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (Path(parts.out) / "adapter_model.safetensors").exists()

    resumed = subprocess.run(
        command + cli_args(replace(parts, resume="auto")),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    expected = load_file(Path(whole.out) / "adapter_model.safetensors")
    actual = load_file(Path(parts.out) / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(actual[name], expected[name], rtol=0, atol=1e-6), name
    steps = [r["step"] for r in read_metrics(Path(parts.out)) if r["kind"] == "train"]
    assert steps == list(range(5, 41, 5))


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, demo_dir, tmp_path_factory) -> train.TrainConfig:
    """The settings of a finished 4-step run, which left a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("finished") / "run"
    config = tiny_config(tiny_model_dir, demo_dir, out, steps=4, save_every=2)
    train.train(config)
    return config


def test_resume_rejects_other_settings(finished_run):
    with pytest.raises(ValueError, match=r"lr: 0\.01 in the checkpoint, 0\.02 now"):
        train.train(replace(finished_run, lr=2e-2, resume="auto"))


def test_existing_checkpoints_need_resume(finished_run):
    with pytest.raises(ValueError, match="pass --resume"):
        train.train(finished_run)


def test_resume_path_without_checkpoint(tiny_model_dir, demo_dir, tmp_path):
    config = tiny_config(tiny_model_dir, demo_dir, tmp_path / "run", resume=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train.train(config)


def test_nonfinite_loss_stops_and_keeps_checkpoint(tiny_model_dir, demo_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(
        tiny_model_dir, demo_dir, run_dir, steps=6, lr=1e30, max_grad_norm=0, save_every=1
    )
    with pytest.raises(FloatingPointError, match="at step 2; the last good checkpoint is"):
        train.train(config)

    assert (run_dir / "checkpoints" / "step-1").is_dir()
    assert not (run_dir / "checkpoints" / "step-2").exists()
    assert not (run_dir / "adapter_model.safetensors").exists()


# -----------------------------------------------------------------------------
# errors


def test_data_without_tasks_json(tiny_model_dir, demo_dir, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_bytes((demo_dir / "train.jsonl").read_bytes())
    config = tiny_config(tiny_model_dir, data_dir, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="tasks.json"):
        train.train(config)


def test_model_without_target_modules(tiny_model_dir, demo_dir, tmp_path):
    config = tiny_config(tiny_model_dir, demo_dir, tmp_path / "run", target_modules="c_attn")
    with pytest.raises(ValueError, match="q_proj"):
        train.train(config)


@pytest.mark.parametrize(
    "flag, value", [("lr", 0.0), ("lr", -1e-4), ("steps", 0), ("steps", -5), ("batch_size", 0)]
)
def test_non_positive_settings_rejected(tiny_model_dir, demo_dir, tmp_path, flag, value):
    config = tiny_config(tiny_model_dir, demo_dir, tmp_path / "run", **{flag: value})
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} must be positive"):
        train.train(config)


def test_dropout_outside_unit_interval_rejected(tiny_model_dir, demo_dir, tmp_path):
    config = tiny_config(tiny_model_dir, demo_dir, tmp_path / "run", lora_dropout=1.5)
    with pytest.raises(ValueError, match=r"--lora-dropout must be in \[0, 1\), got 1.5"):
        train.train(config)
    assert not (tmp_path / "run").exists()


def test_cli_defaults_match_config():
    assert train.parse_args(["--data", "d", "--out", "o"]) == train.TrainConfig(data="d", out="o")


def test_cli_flags_parse_to_field_types():
    config = train.parse_args(
        ["--data", "d", "--out", "o", "--weight-decay", "0.1", "--steps", "7", "--resume"]
    )
    assert config.weight_decay == 0.1
    assert config.steps == 7
    assert config.resume == "auto"


def test_cli_prints_error_and_exits_1(demo_dir, tmp_path, capsys):
    code = train.main(["--data", str(demo_dir), "--out", str(tmp_path / "run"), "--lr", "0"])
    assert code == 1
    assert "error: --lr must be positive, got 0.0" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# multiple processes


def test_torchrun_two_ranks_identical_adapters(tiny_model_dir, demo_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_model_dir, demo_dir, run_dir, steps=6, log_every=3, save_every=3)
    # Each rank saves the adapter it ended with, next to the one rank 0 wrote.
    script = tmp_path / "train_and_dump.py"
    script.write_text(
        "import os, sys\n"
        "from safetensors.torch import save_file\n"
        "import train\n"
        "model = train.train(train.parse_args(sys.argv[1:]))\n"
        "tensors = {k: v.contiguous() for k, v in model.adapter_state_dict().items()}\n"
        f"save_file(tensors, '{tmp_path}/rank' + os.environ['RANK'] + '.safetensors')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    result = subprocess.run(
        command + [str(script)] + cli_args(config),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_config = json.loads((run_dir / "train_config.json").read_text(encoding="utf-8"))
    assert run_config["world_size"] == 2

    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    written = load_file(run_dir / "adapter_model.safetensors")
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name
        assert torch.equal(tensor, written[name]), name
    lora_b = [name for name in rank0 if name.endswith("lora_B")]
    assert any(rank0[name].abs().sum() > 0 for name in lora_b), "B never left zero"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-3", "step-6"]


# -----------------------------------------------------------------------------
# the packaged default model


def test_default_model_trains_two_steps(demo_dir, tmp_path):
    config = train.TrainConfig(
        data=str(demo_dir),
        out=str(tmp_path / "run"),
        device="cpu",
        steps=2,
        batch_size=2,
        max_length=128,
        log_every=1,
        eval_max_per_task=1,
        save_every=0,
    )
    model = train.train(config)

    records = read_metrics(Path(config.out))
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    saved = train.MoELoRAModel.read_adapter_config(config.out)
    assert saved["base_model_name_or_path"] == train.DEFAULT_MODEL
    assert model.config.vocab_size == 49152


def test_missing_model_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        train.load_model_and_tokenizer(str(tmp_path / "absent"))
