"""Speed and memory of the adapter variants, measured side by side on one model and machine.

Every variant adapts the same projections of the same frozen base model and trains on the same
batches:

    floor          no adapter; the input embeddings require grad so that backward runs
    peft-lora      PEFT LoRA of rank r
    lora           MoELoRAModel with one expert of rank r
    moelora-loop   MOELoRA as the original implementation computes it: a Python loop over E
                   separate per-expert linear pairs of rank r/E, each with its own dropout
    moelora        MoELoRAModel, E experts of rank r/E, task gate
    moelora-16x1   MoELoRAModel, 16 experts of rank r/16, task gate
    molora         MoELoRAModel, E experts of rank r/E, token gate (a router per layer)

A training step is forward, backward and an AdamW step (floor has nothing to update, so its
step is forward and backward). Step times come from one process that runs the variants
interleaved (A B C A B C ...) after warm-up rounds, so a slow phase of a shared machine hits
all of them alike. Peak memory comes from a separate process per variant that runs a few
steps: on CPU the peak resident set size (VmHWM, reset after the model is loaded where Linux
allows it), on CUDA the peak allocated memory.

Inference: greedy generation of a fixed number of new tokens for a batch of prompts, with the
base model, with MOELoRA routed per sequence on a mixed-task batch, and with MOELoRA merged for
one task. All batches hold random token ids of full length, so no sequence is padded.

    python bench.py                          # packaged SmolLM2-135M-Instruct, float32, CPU
    python bench.py --tiny                   # small random Llama, under a minute on 2 cores
    python bench.py --device cuda --dtype bfloat16 --batch-size 16 --seq-len 512
"""

import argparse
import copy
import functools
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from moelora import MoELoRAConfig, MoELoRAModel
from train import DEFAULT_MODEL, load_model_and_tokenizer, resolve_device_and_dtype

VARIANTS = (
    "floor",
    "peft-lora",
    "lora",
    "moelora-loop",
    "moelora",
    "moelora-16x1",
    "molora",
)
GENERATION_VARIANTS = ("base", "moelora-routed", "moelora-merged")
# The seven projections of a Llama block.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BenchConfig:
    model: str = DEFAULT_MODEL  # Hugging Face id, local folder, or the packaged default
    tiny: bool = False  # a small random Llama instead of `model`
    device: str | None = None  # None: CUDA when available, else CPU
    dtype: str | None = None  # compute dtype under autocast; None: bfloat16 on CUDA, else float32
    batch_size: int = 4  # sequences per training batch
    seq_len: int = 128  # tokens per training sequence
    warmup: int = 1  # untimed rounds over all variants before the timed ones
    repeats: int = 5  # timed rounds; each round runs one step of every variant
    gen_repeats: int = 10  # timed generation rounds; a round is short, and decoding is noisy
    memory: bool = True  # measure peak memory, in a process per variant
    memory_steps: int = 2  # training steps run by each memory-measuring process
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    rank: int = 16  # total adapter rank r
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter input
    num_experts: int = 8  # E for moelora, moelora-loop and molora
    num_tasks: int = 8  # task ids in the random batches
    gen_batch_size: int = 8  # prompts per generation batch
    gen_prompt_len: int = 64  # tokens per prompt
    gen_new_tokens: int = 32  # tokens generated per prompt, exactly (end of sequence is ignored)
    seed: int = 0
    profile: bool = False  # print torch.profiler tables: one training step, one generation call
    json: str | None = None  # write the results to this file as well


# -----------------------------------------------------------------------------
# the per-expert loop, the reference that the fused layer in moelora.py replaces


class LoopMoELoRALinear(nn.Module):
    """A frozen linear layer plus E separate expert pairs, summed in a Python loop.

    This follows MMOELoraLinear.forward in the original code (liuqidong07/MOELoRA-peft,
    src/MLoRA/peft/tuners/mmoelora.py): one nn.Linear pair per expert, and dropout applied to
    the layer input once per expert, so each expert draws its own mask and keeps its own dropped
    copy of the input for backward.
    """

    def __init__(self, base_layer: nn.Linear, num_experts: int, expert_rank: int, config):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = config.alpha / config.rank
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.ModuleList(
            nn.Linear(base_layer.in_features, expert_rank, bias=False, **factory)
            for _ in range(num_experts)
        )
        self.lora_B = nn.ModuleList(
            nn.Linear(expert_rank, base_layer.out_features, bias=False, **factory)
            for _ in range(num_experts)
        )
        self.lora_dropout = nn.Dropout(config.dropout)
        for lora_A, lora_B in zip(self.lora_A, self.lora_B, strict=True):
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
        self.gate_weights: torch.Tensor | None = None  # (B, E), set before every forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, D_out)
        for i, (lora_A, lora_B) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            expert_out = lora_B(lora_A(self.lora_dropout(x)))  # (B, T, D_out)
            out += expert_out * self.scaling * self.gate_weights[:, i, None, None]
        return out


class LoopMoELoRAModel(nn.Module):
    """A causal LM whose target projections are LoopMoELoRALinear layers sharing one task gate.

    The original code gives every layer its own task embedding and gate. Here one gate is
    computed once per forward pass, as in moelora.py, so the parameter count matches and this
    model differs from MoELoRAModel only in how the experts are computed.
    """

    def __init__(self, base_model: nn.Module, config: BenchConfig, num_tasks: int):
        super().__init__()
        self.base_model = base_model
        device = next(base_model.parameters()).device
        self.task_embedding = nn.Embedding(num_tasks, 64, device=device)
        self.gate = nn.Linear(64, config.num_experts, bias=False, device=device)
        for p in base_model.parameters():
            p.requires_grad_(False)
        expert_rank = config.rank // config.num_experts
        self.layers = []
        for name in _target_names(base_model):
            parent_name, _, child_name = name.rpartition(".")
            parent = base_model.get_submodule(parent_name)
            layer = LoopMoELoRALinear(
                getattr(parent, child_name), config.num_experts, expert_rank, config
            )
            setattr(parent, child_name, layer)
            self.layers.append(layer)

    def forward(self, input_ids, attention_mask, labels, task_ids):
        gate_weights = F.softmax(self.gate(self.task_embedding(task_ids)), dim=-1)  # (B, E)
        for layer in self.layers:
            layer.gate_weights = gate_weights
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


# -----------------------------------------------------------------------------
# variants


@dataclass
class Variant:
    name: str
    model: nn.Module
    takes_task_ids: bool  # forward accepts task_ids
    optimizer: torch.optim.Optimizer | None  # None when nothing is trainable (floor)
    trainable_params: int


def moelora_config(config: BenchConfig, num_experts: int, gate: str = "task") -> MoELoRAConfig:
    """Build the MoELoRAConfig of a variant: the bench's rank, alpha, dropout and targets."""
    return MoELoRAConfig(
        num_tasks=config.num_tasks,
        num_experts=num_experts,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        target_modules=TARGET_MODULES,
        gate=gate,
    )


def build_variant(name: str, base_model: nn.Module, config: BenchConfig) -> Variant:
    """Put adapter variant `name` on a copy of `base_model` that shares its frozen weights."""
    model = _share_weights_copy(base_model)
    if name == "floor":
        model.enable_input_require_grads()
        wrapped, takes_task_ids = model, False
    elif name == "peft-lora":
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=TARGET_MODULES,
            task_type="CAUSAL_LM",
        )
        wrapped, takes_task_ids = get_peft_model(model, peft_config), False
    elif name == "lora":
        wrapped = MoELoRAModel(model, moelora_config(config, num_experts=1))
        takes_task_ids = True
    elif name == "moelora-loop":
        wrapped, takes_task_ids = LoopMoELoRAModel(model, config, config.num_tasks), True
    elif name == "moelora":
        wrapped = MoELoRAModel(model, moelora_config(config, config.num_experts))
        takes_task_ids = True
    elif name == "moelora-16x1":
        wrapped = MoELoRAModel(model, moelora_config(config, num_experts=16))
        takes_task_ids = True
    elif name == "molora":
        token_gated = moelora_config(config, config.num_experts, gate="token")
        wrapped, takes_task_ids = MoELoRAModel(model, token_gated), True
    else:
        raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")

    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    trainable = sum(p.numel() for p in params)
    return Variant(name, wrapped, takes_task_ids, optimizer, trainable)


def train_step(variant: Variant, batch: dict, autocast) -> torch.Tensor:
    """Run forward, backward and the optimizer step; return the loss."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if variant.takes_task_ids:
        kwargs["task_ids"] = batch["task_ids"]
    with autocast():
        loss = variant.model(**kwargs).loss
    loss.backward()
    if variant.optimizer is not None:
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# -----------------------------------------------------------------------------
# measurements


def time_training(config: BenchConfig, base_model, batches, device, autocast) -> dict:
    """Time one training step per variant per round, interleaved; return seconds per variant."""
    variants = [build_variant(name, base_model, config) for name in config.variants]
    seconds = {v.name: [] for v in variants}
    rounds = config.warmup + config.repeats
    for round_index in tqdm(range(rounds), desc="training steps", unit="round"):
        batch = batches[round_index % len(batches)]
        for variant in variants:
            _synchronize(device)
            start = time.perf_counter()
            train_step(variant, batch, autocast)
            _synchronize(device)
            if round_index >= config.warmup:
                seconds[variant.name].append(time.perf_counter() - start)
    if config.profile:
        for variant in variants:
            step = functools.partial(train_step, variant, batches[0], autocast)
            _profile(f"{variant.name}, one training step", step, device, config.rank)
    params = {v.name: v.trainable_params for v in variants}
    return {"seconds": seconds, "trainable_params": params}


def time_generation(config: BenchConfig, base_model, device, autocast) -> dict:
    """Time greedy generation for the base model, MOELoRA routed, and MOELoRA merged."""
    adapter_config = moelora_config(config, config.num_experts)
    routed = MoELoRAModel(_share_weights_copy(base_model), adapter_config).eval()
    # Merging writes into the base weights, so the merged model gets weights of its own.
    merged = MoELoRAModel(copy.deepcopy(base_model), adapter_config).eval()
    merged.merge(0)

    generator = torch.Generator().manual_seed(config.seed + 1)
    vocab_size = base_model.config.vocab_size
    shape = (config.gen_batch_size, config.gen_prompt_len)
    input_ids = torch.randint(0, vocab_size, shape, generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    mixed_task_ids = (torch.arange(config.gen_batch_size) % config.num_tasks).to(device)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "max_new_tokens": config.gen_new_tokens,
        "min_new_tokens": config.gen_new_tokens,
        "do_sample": False,
        "pad_token_id": base_model.generation_config.pad_token_id or 0,
    }
    runs = {
        "base": lambda: base_model.generate(**kwargs),
        "moelora-routed": lambda: routed.generate(task_ids=mixed_task_ids, **kwargs),
        "moelora-merged": lambda: merged.generate(
            task_ids=torch.zeros_like(mixed_task_ids), **kwargs
        ),
    }
    seconds = {name: [] for name in runs}
    rounds = config.warmup + config.gen_repeats
    for round_index in tqdm(range(rounds), desc="generation", unit="round"):
        for name, run in runs.items():
            _synchronize(device)
            start = time.perf_counter()
            with autocast():
                out = run()
            _synchronize(device)
            if round_index >= config.warmup:
                seconds[name].append(time.perf_counter() - start)
            new_tokens = out.shape[1] - config.gen_prompt_len
            assert new_tokens == config.gen_new_tokens, (name, new_tokens)
    if config.profile:
        for name, run in runs.items():
            with autocast():
                _profile(f"{name}, one generation call", run, device, config.rank)
    return {"seconds": seconds}


def measure_memory(config: BenchConfig) -> dict:
    """Run each variant's training steps in a process of its own; return its peak memory."""
    device, _ = resolve_device_and_dtype(config.device, config.dtype)
    # Forked processes inherit these imports instead of paying seconds each for them. CUDA
    # cannot be initialized in a fork, so CUDA runs spawn fresh processes.
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    if "peft-lora" in config.variants:
        import peft  # noqa: F401
    context = multiprocessing.get_context("spawn" if device.type == "cuda" else "fork")
    results = {}
    for name in tqdm(config.variants, desc="peak memory", unit="variant"):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_memory_worker, args=(config, name, sender))
        process.start()
        sender.close()
        try:
            result = receiver.recv()
        except EOFError:
            result = None
        process.join()
        if process.exitcode != 0 or result is None:
            raise RuntimeError(
                f"the memory process for variant {name} failed with exit code "
                f"{process.exitcode} (a negative code is the signal, -9 usually out of memory)"
            )
        results[name] = result
    return results


def _memory_worker(config: BenchConfig, name: str, sender):
    """Build one variant, run `memory_steps` training steps, and send the peak memory."""
    torch.manual_seed(config.seed)
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    autocast = _autocast_factory(device, dtype)
    base_model = load_base_model(config, device)
    batches = make_batches(config, base_model.config.vocab_size, device, count=1)
    variant = build_variant(name, base_model, config)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        loaded = torch.cuda.memory_allocated(device)
        rss_reset = None
    else:
        rss_reset = _reset_peak_rss()
        loaded = _current_rss()
    for _ in range(config.memory_steps):
        train_step(variant, batches[0], autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _peak_rss()
    sender.send({"peak_bytes": peak, "loaded_bytes": loaded, "peak_reset": rss_reset})
    sender.close()


def _profile(label: str, run, device: torch.device, rank: int):
    """Print the operators that take the most time in one call of `run`.

    Also print the share of the matrix products with a dimension of `rank`. Those are the
    adapter's own products, because no base model projection has that dimension.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as profiler:
        run()
    print(f"\n### profile: {label}\n")
    kind = "cuda" if device.type == "cuda" else "cpu"
    sort_by = f"self_{kind}_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=40))

    by_shape = profiler.key_averages(group_by_input_shape=True)
    products = [e for e in by_shape if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    low_rank = [e for e in products if any(rank in shape for shape in e.input_shapes)]
    seconds = [sum(getattr(e, sort_by) for e in events) / 1e6 for events in (by_shape, low_rank)]
    calls = sum(e.count for e in low_rank)
    print(
        f"matrix products with a dimension of {rank}: {calls} calls, {seconds[1]:.3f} s of "
        f"{seconds[0]:.3f} s self {kind.upper()} time ({seconds[1] / seconds[0]:.1%})"
    )


# -----------------------------------------------------------------------------
# report


def training_rows(config: BenchConfig, timing: dict, memory: dict) -> list[dict]:
    """Build one row per variant: step time statistics, throughput, parameters, memory, ratios."""
    tokens = config.batch_size * config.seq_len
    medians = {name: statistics.median(s) for name, s in timing["seconds"].items()}
    rows = []
    for name in config.variants:
        seconds = timing["seconds"][name]
        row = {
            "variant": name,
            "trainable_params": timing["trainable_params"][name],
            "median_s": medians[name],
            "min_s": min(seconds),
            "max_s": max(seconds),
            "tokens_per_s": tokens / medians[name],
        }
        if name in memory:
            row["peak_mib"] = memory[name]["peak_bytes"] / 2**20
            row["loaded_mib"] = memory[name]["loaded_bytes"] / 2**20
        for reference in ("peft-lora", "floor"):
            if reference in medians:
                row[f"time_vs_{reference}"] = medians[name] / medians[reference]
        if name in memory and "peft-lora" in memory:
            row["memory_vs_peft-lora"] = (
                memory[name]["peak_bytes"] / memory["peft-lora"]["peak_bytes"]
            )
        rows.append(row)
    return rows


def generation_rows(config: BenchConfig, timing: dict) -> list[dict]:
    new_tokens = config.gen_batch_size * config.gen_new_tokens
    base_median = statistics.median(timing["seconds"]["base"])
    rows = []
    for name, seconds in timing["seconds"].items():
        median = statistics.median(seconds)
        rows.append(
            {
                "variant": name,
                "median_s": median,
                "min_s": min(seconds),
                "max_s": max(seconds),
                "new_tokens_per_s": new_tokens / median,
                "time_vs_base": median / base_median,
            }
        )
    return rows


def check_targets(train: list[dict], generation: list[dict]) -> list[dict]:
    """Compare this run's ratios with the speed and memory targets; skip what was not run."""
    time_s = {row["variant"]: row["median_s"] for row in train}
    peak = {row["variant"]: row["peak_mib"] for row in train if "peak_mib" in row}
    gen_s = {row["variant"]: row["median_s"] for row in generation}
    targets = [
        ("moelora / peft-lora step time", time_s, "moelora", "peft-lora", 1.00),
        ("moelora / peft-lora peak memory", peak, "moelora", "peft-lora", 1.05),
        ("moelora / moelora-loop step time", time_s, "moelora", "moelora-loop", 0.35),
        ("moelora / moelora-loop peak memory", peak, "moelora", "moelora-loop", 0.30),
        ("moelora-16x1 / moelora step time", time_s, "moelora-16x1", "moelora", 1.03),
        ("moelora / floor step time", time_s, "moelora", "floor", 1.25),
        ("merged / base generation time", gen_s, "moelora-merged", "base", 1.02),
        ("routed / base generation time", gen_s, "moelora-routed", "base", 1.15),
    ]
    results = []
    for label, values, numerator, denominator, limit in targets:
        if numerator in values and denominator in values:
            ratio = values[numerator] / values[denominator]
            results.append({"target": label, "limit": limit, "ratio": ratio, "met": ratio <= limit})
    return results


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Format rows as a Markdown table; columns are (header, key, format spec)."""
    lines = [
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for row in rows:
        cells = [format(row[key], spec) if key in row else "-" for _, key, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TRAIN_COLUMNS = [
    ("variant", "variant", ""),
    ("trainable params", "trainable_params", ","),
    ("median s/step", "median_s", ".3f"),
    ("min s", "min_s", ".3f"),
    ("max s", "max_s", ".3f"),
    ("tokens/s", "tokens_per_s", ".0f"),
    ("peak MiB", "peak_mib", ".0f"),
    ("time / peft-lora", "time_vs_peft-lora", ".2f"),
    ("time / floor", "time_vs_floor", ".2f"),
    ("memory / peft-lora", "memory_vs_peft-lora", ".2f"),
]
GENERATION_COLUMNS = [
    ("generation", "variant", ""),
    ("median s", "median_s", ".3f"),
    ("min s", "min_s", ".3f"),
    ("max s", "max_s", ".3f"),
    ("new tokens/s", "new_tokens_per_s", ".1f"),
    ("time / base", "time_vs_base", ".3f"),
]
TARGET_COLUMNS = [
    ("target", "target", ""),
    ("limit", "limit", ".2f"),
    ("measured", "ratio", ".3f"),
    ("result", "result", ""),
]


# -----------------------------------------------------------------------------
# helpers


def load_base_model(config: BenchConfig, device: torch.device) -> nn.Module:
    """Load the base model in float32 (or build the tiny one), frozen, on `device`."""
    if config.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(config.seed)
        llama_config = LlamaConfig(
            vocab_size=1000,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = LlamaForCausalLM(llama_config).to(device).eval()
    else:
        model, _ = load_model_and_tokenizer(config.model, dtype=torch.float32, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_batches(config: BenchConfig, vocab_size: int, device, count: int = 4) -> list[dict]:
    """Random full-length training batches with labels equal to the inputs and mixed task ids."""
    generator = torch.Generator().manual_seed(config.seed)
    batches = []
    for _ in range(count):
        shape = (config.batch_size, config.seq_len)
        input_ids = torch.randint(0, vocab_size, shape, generator=generator)
        task_ids = torch.randint(0, config.num_tasks, (config.batch_size,), generator=generator)
        batch = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": input_ids.clone(),
            "task_ids": task_ids,
        }
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def _share_weights_copy(model: nn.Module) -> nn.Module:
    """Deep-copy the module tree but keep the (frozen) parameters themselves shared."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _target_names(model: nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES
    ]


def _autocast_factory(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux 4.0+); return whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _current_rss() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def _peak_rss() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


def source_version() -> dict:
    """Return the git commit of this checkout and the measured files that differ from it."""
    folder = Path(__file__).resolve().parent
    git = {"cwd": folder, "capture_output": True, "text": True, "check": True}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **git).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "moelora.py", "bench.py"], **git
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "uncommitted": None}
    return {"commit": commit, "uncommitted": [line[3:] for line in status.splitlines()]}


def machine_description(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(config: BenchConfig) -> dict:
    """Run every measurement and return the results as one dict."""
    unknown = [name for name in config.variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected names from {', '.join(VARIANTS)}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {config.dropout}")
    if min(config.repeats, config.gen_repeats, config.memory_steps) < 1 or config.warmup < 0:
        raise ValueError(
            "--repeats, --gen-repeats and --memory-steps must be at least 1, --warmup at least 0"
        )
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    autocast = _autocast_factory(device, dtype)
    source = source_version()  # before the long run, so a later edit is not attributed to it

    # Memory first: the forked processes start before this one loads any model.
    memory = measure_memory(config) if config.memory else {}

    torch.manual_seed(config.seed)
    base_model = load_base_model(config, device)
    batches = make_batches(config, base_model.config.vocab_size, device)
    timing = time_training(config, base_model, batches, device, autocast)
    generation = time_generation(config, base_model, device, autocast)

    train = training_rows(config, timing, memory)
    gen = generation_rows(config, generation)
    return {
        "config": asdict(config),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "machine": machine_description(device),
        "source": source,
        "memory_peak_reset": all(m["peak_reset"] is not False for m in memory.values()),
        "train": train,
        "generation": gen,
        "targets": check_targets(train, gen),
        "raw_seconds": {"train": timing["seconds"], "generation": generation["seconds"]},
    }


def format_report(results: dict) -> str:
    config = results["config"]
    model = "tiny random Llama" if config["tiny"] else config["model"]
    memory_kind = "CUDA peak allocated" if results["device"].startswith("cuda") else "peak RSS"
    header = (
        f"model={model} device={results['device']} dtype={results['dtype']} "
        f"batch={config['batch_size']}x{config['seq_len']} warmup={config['warmup']} "
        f"repeats={config['repeats']} gen_repeats={config['gen_repeats']} "
        f"dropout={config['dropout']} memory={memory_kind}"
    )
    targets = [dict(t, result="met" if t["met"] else "missed") for t in results["targets"]]
    sections = [
        header,
        markdown_table(results["train"], TRAIN_COLUMNS),
        markdown_table(results["generation"], GENERATION_COLUMNS),
        markdown_table(targets, TARGET_COLUMNS),
    ]
    if config["tiny"]:
        sections.append(
            "The targets are set for a real model. On the tiny model, which is mostly overhead, "
            "they show only that every measurement ran."
        )
    return "\n\n".join(sections)


def write_json(results: dict, path: str):
    """Write `results` to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def parse_args(argv=None) -> BenchConfig:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=defaults.model,
        help="Hugging Face id or local folder (default: %(default)s)",
    )
    parser.add_argument("--tiny", action="store_true", help="use a small random Llama")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype under autocast; weights stay float32 (default: bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="sequences per training batch (default: 4, or 2 with --tiny)"
    )
    parser.add_argument(
        "--seq-len", type=int, help="tokens per training sequence (default: 128, or 64 with --tiny)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=defaults.repeats,
        help="timed training rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--gen-repeats",
        type=int,
        default=defaults.gen_repeats,
        help="timed generation rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=defaults.warmup,
        help="untimed rounds before the timed ones (default: %(default)s)",
    )
    parser.add_argument(
        "--dropout",
        type=float,
        default=defaults.dropout,
        help=f"dropout probability on every adapter input (default: {defaults.dropout})",
    )
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=defaults.memory_steps,
        help="training steps per memory-measuring process (default: %(default)s)",
    )
    parser.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the peak memory processes (the memory columns show -)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of: {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a torch.profiler table of one training step per variant and one generation",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    # The tiny model gets a smaller batch so that the whole run takes under a minute.
    batch_size = args.batch_size or (2 if args.tiny else defaults.batch_size)
    seq_len = args.seq_len or (64 if args.tiny else defaults.seq_len)
    return BenchConfig(
        model=args.model,
        tiny=args.tiny,
        device=args.device,
        dtype=args.dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        warmup=args.warmup,
        repeats=args.repeats,
        gen_repeats=args.gen_repeats,
        memory=args.memory,
        memory_steps=args.memory_steps,
        dropout=args.dropout,
        variants=[name.strip() for name in args.variants.split(",") if name.strip()],
        profile=args.profile,
        json=args.json,
    )


def main(argv=None):
    # PEFT 0.21 calls a transformers 5.x property that warns on every model it wraps.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # e.g. the model's conversion
    config = parse_args(argv)
    results = run(config)
    print(format_report(results))
    if config.json:
        write_json(results, config.json)


if __name__ == "__main__":
    sys.exit(main())
