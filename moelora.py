"""MOELoRA: LoRA split into experts, mixed by a gate that reads the task id.

Liu et al., "When MOE Meets LLMs: Parameter Efficient Fine-tuning for Multi-task Medical
Applications", SIGIR 2024, arXiv:2310.18339.

For a frozen linear layer W0 and a sequence of task t, every adapted layer computes

    h = W0 x + (alpha / r) * sum_i w[t, i] * B_i A_i x,      w[t] = softmax(W_g e_t)

where e_t is a learned task embedding and (W_g, e) form one gate shared by all adapted layers.
Expert i owns A_i (r/E, D_in) and B_i (D_out, r/E), so the E experts together have the
parameters of one LoRA of rank r. The experts are computed fused, as one LoRA of rank r whose
r-dimensional hidden activation is scaled by the gate weights, each repeated r/E times:

        x ──────────────► W0 (frozen) ─────────────────────────────┐
        │                                                          + ──► h
        └─► dropout ─► A = [A_1; ...; A_E] ─► ⊙ w[t] ─► B = [B_1 | ... | B_E] ─► × alpha/r
                        (r, D_in)              (r,)       (D_out, r)
                                                ▲
                     task id t ─► embedding e_t ─► W_g ─► softmax ─► w[t]  (E,)

With `gate="token"` each layer has its own router on its input instead (softmax per token,
the MoLoRA baseline). With one expert the layer is exactly LoRA of rank r.

Shape legend: B batch, T tokens, D_in / D_out layer widths, E experts, r total rank,
R = r / E rank per expert.
"""

import json
import math
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# Linear projections of attention and MLP blocks in Llama, Qwen2, Mistral, Gemma, Phi-3,
# GPT-NeoX/Falcon-style and OPT-style models, matched as the last part of a module name.
# fmt: off
DEFAULT_TARGET_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "out_proj",
    "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2",
)
# fmt: on
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class MoELoRAConfig:
    num_tasks: int  # number of task ids the gate accepts: 0 .. num_tasks - 1
    num_experts: int = 8  # E: experts per adapted layer; 1 is plain LoRA
    rank: int = 16  # r: total rank over all experts, each expert gets r / E
    alpha: float = 32.0  # the update is scaled by alpha / r, as in LoRA
    dropout: float = 0.05  # dropout on the adapter's input
    task_embedding_dim: int = 64  # size of the learned task embedding e_t
    target_modules: list[str] | str | None = None  # name suffixes, a regex, or None for defaults
    gate: str = "task"  # "task": one gate on the task id; "token": a router per layer and token

    def __post_init__(self):
        if self.num_tasks < 1 or self.num_experts < 1 or self.rank < 1:
            raise ValueError(
                f"num_tasks, num_experts and rank must be positive, got {self.num_tasks}, "
                f"{self.num_experts} and {self.rank}"
            )
        if self.rank % self.num_experts:
            raise ValueError(
                f"rank {self.rank} is not divisible by num_experts {self.num_experts}: "
                "each expert gets rank / num_experts, so pick a multiple"
            )
        if self.gate not in ("task", "token"):
            raise ValueError(f"gate must be 'task' or 'token', got {self.gate!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout}")

    @property
    def expert_rank(self) -> int:
        return self.rank // self.num_experts  # R = r / E


class TaskGate(nn.Module):
    """The gate shared by every adapted layer: w[t] = softmax(W_g e_t)."""

    def __init__(self, num_tasks: int, num_experts: int, embedding_dim: int):
        super().__init__()
        self.task_embedding = nn.Embedding(num_tasks, embedding_dim)
        self.proj = nn.Linear(embedding_dim, num_experts, bias=False)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.proj(self.task_embedding(task_ids)), dim=-1)  # (B, E)


class RoutingState:
    """Per-call context read by every adapted layer: the gate weights and the merge state.

    The wrapper fills it before calling the base model, so no model code has to carry task ids.
    """

    def __init__(self, expert_rank: int, scaling: float):
        self.expert_rank, self.scaling = expert_rank, scaling  # the same for every layer
        self.gate_weights: torch.Tensor | None = None  # (B, E), task gate only
        self.merged_task: int | None = None
        self._dropout_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scale_cache: torch.Tensor | None = None  # (B, 1, r)

    def hidden_scale(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Return each gate weight repeated R times and multiplied by alpha / r, as (B, 1, r).

        The tensor is computed once per call of the model and reused by every layer.
        """
        cached = self._scale_cache
        if cached is not None and cached.shape[0] == batch_size and cached.dtype == dtype:
            return cached
        weights = self.gate_weights
        if weights is None:
            raise ValueError("task_ids is required: pass one task id per sequence")
        if weights.shape[0] != batch_size:
            # generate() repeats each row for beams or multiple samples: (B, E) -> (B * k, E)
            if batch_size % weights.shape[0]:
                raise ValueError(f"got {weights.shape[0]} task ids for a batch of {batch_size}")
            weights = weights.repeat_interleave(batch_size // weights.shape[0], dim=0)
        scale = weights.to(dtype).repeat_interleave(self.expert_rank, dim=-1) * self.scaling
        self._scale_cache = scale[:, None, :]
        return self._scale_cache

    def dropout(self, x: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
        # Projections that read the same tensor (q, k and v, or gate and up) share one dropout
        # mask. That saves the time and memory of the extra masks and dropped copies.
        if not dropout.training or dropout.p == 0:
            return x
        if self._dropout_cache is None or self._dropout_cache[0] is not x:
            self._dropout_cache = (x, dropout(x))
        return self._dropout_cache[1]

    def release_inputs(self):
        self._dropout_cache = None

    def clear(self):
        self.gate_weights = None
        self._dropout_cache = None
        self._scale_cache = None


class MoELoRALinear(nn.Module):
    """A frozen nn.Linear plus E low-rank experts, fused into one A and one B."""

    def __init__(self, base_layer: nn.Linear, config: MoELoRAConfig, state: RoutingState):
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        self.num_experts, self.expert_rank = config.num_experts, config.expert_rank
        self.scaling = config.alpha / config.rank
        self.dropout = nn.Dropout(config.dropout)
        d_out, d_in = base_layer.weight.shape
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(config.rank, d_in, **factory))  # [A_1; ...; A_E]
        self.lora_B = nn.Parameter(torch.zeros(d_out, config.rank, **factory))  # [B_1 | ... | B_E]
        # Each A_i is initialized as a standard LoRA A; B = 0 so training starts at the base model.
        for a_i in self.lora_A.split(self.expert_rank):
            nn.init.kaiming_uniform_(a_i, a=math.sqrt(5))
        self.router = None
        if config.gate == "token":
            self.router = nn.Linear(d_in, config.num_experts, bias=False, **factory)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base_layer(x)
        if self.state.merged_task is not None:
            return base_out  # the task's update is already inside W0

        # One LoRA of rank r computes every expert at once.
        lora_A, lora_B = self.lora_A, self.lora_B
        if lora_A.dtype != x.dtype:  # half-precision input: a bf16 model, or autocast output
            lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        hidden = F.linear(self.state.dropout(x, self.dropout), lora_A)  # (B, T, r)

        # Scale each expert's R hidden units by its gate weight, per sequence or per token.
        # alpha / r is applied here too, to r columns, rather than to the D_out columns of delta.
        if self.router is None:
            scale = self.state.hidden_scale(x.shape[0], hidden.dtype)  # (B, 1, r)
        else:
            gate_weights = F.softmax(F.linear(x, self.router.weight.to(x.dtype)), dim=-1)
            scale = gate_weights.to(hidden.dtype).repeat_interleave(self.expert_rank, dim=-1)
            scale = scale * self.scaling  # (B, T, r)

        delta = F.linear(hidden * scale, lora_B)  # (B, T, D_out)
        return base_out + delta

    def task_delta_weight(self, gate_weights: torch.Tensor) -> torch.Tensor:
        """Return the task's update sum_i w_i B_i A_i * scaling as one (D_out, D_in) matrix."""
        return (self.scaled_B(gate_weights) @ self.lora_A) * self.scaling

    def scaled_B(self, gate_weights: torch.Tensor) -> torch.Tensor:
        """Return [w_1 B_1 | ... | w_E B_E] for gate weights of shape (E,)."""
        return self.lora_B * gate_weights.repeat_interleave(self.expert_rank)  # (D_out, r)


class MoELoRAModel(nn.Module):
    """Any Hugging Face causal LM with MOELoRA adapters injected in place and its base frozen."""

    def __init__(self, base_model: nn.Module, config: MoELoRAConfig):
        super().__init__()
        self.base_model = base_model
        self.adapter_config = config
        self.state = RoutingState(config.expert_rank, config.alpha / config.rank)
        self.gate = None
        if config.gate == "task":
            self.gate = TaskGate(config.num_tasks, config.num_experts, config.task_embedding_dim)
            self.gate.to(next(base_model.parameters()).device)
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.target_names = _inject(base_model, config, self.state)

    # The base model's own config and generation settings stay reachable as usual.
    @property
    def config(self):
        return self.base_model.config

    @property
    def generation_config(self):
        return self.base_model.generation_config

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def merged_task(self) -> int | None:
        return self.state.merged_task

    def adapted_layers(self) -> dict[str, MoELoRALinear]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, MoELoRALinear)}

    def gate_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            raise ValueError("gate_weights needs the task gate; this model uses gate='token'")
        return self.gate(task_ids.to(self.device))  # (B, E)

    def _route(self, task_ids: torch.Tensor | None, batch_size: int):
        """Check the task ids and compute the gate weights that every adapted layer reads."""
        self.state.clear()
        merged = self.state.merged_task
        if task_ids is None:
            if self.gate is not None and merged is None:
                raise ValueError("task_ids is required: pass one task id per sequence")
            return
        task_ids = torch.as_tensor(task_ids, device=self.device).long().reshape(-1)  # (B,)
        if task_ids.numel() != batch_size:
            raise ValueError(f"got {task_ids.numel()} task ids for a batch of {batch_size}")
        if ((task_ids < 0) | (task_ids >= self.adapter_config.num_tasks)).any():
            raise ValueError(
                f"task ids must lie in 0..{self.adapter_config.num_tasks - 1}, "
                f"got {task_ids.tolist()}"
            )
        if merged is not None and (task_ids != merged).any():
            raise ValueError(
                f"the adapter is merged for task {merged} but the batch has task ids "
                f"{sorted(set(task_ids.tolist()))}: call unmerge() first"
            )
        if self.gate is not None and merged is None:
            self.state.gate_weights = self.gate(task_ids)  # computed once, read by every layer

    def forward(self, input_ids=None, attention_mask=None, labels=None, task_ids=None, **kwargs):
        batch_size = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[0]
        self._route(task_ids, batch_size)
        try:
            return self.base_model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )
        finally:
            # NOTE: the gate weights stay set until the next call, because gradient checkpointing
            # recomputes each layer during backward and reads them again. Run backward before the
            # next forward when checkpointing (as every ordinary training loop does).
            self.state.release_inputs()

    @torch.no_grad()
    def generate(self, input_ids=None, task_ids=None, **kwargs):
        """Generate with the base model's generate(); each row, and its beams, keep their task."""
        batch_size = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[0]
        self._route(task_ids, batch_size)
        try:
            return self.base_model.generate(input_ids=input_ids, **kwargs)
        finally:
            self.state.clear()

    # Merging: because the gate reads only the task, a task's update is one matrix per layer.
    def merge(self, task_id: int):
        """Fold task `task_id`'s update into the base weights, for inference at base-model cost."""
        if self.state.merged_task is not None:
            raise ValueError(f"already merged for task {self.state.merged_task}: unmerge() first")
        self._add_task_delta(task_id, sign=1.0)
        self.state.merged_task = int(task_id)

    def unmerge(self):
        """Subtract the merged task's update, restoring the base weights up to rounding."""
        if self.state.merged_task is not None:
            self._add_task_delta(self.state.merged_task, sign=-1.0)
            self.state.merged_task = None

    @torch.no_grad()
    def _add_task_delta(self, task_id: int, sign: float):
        # NOTE: with bf16 or fp16 base weights, merge then unmerge is exact only up to rounding.
        if self.gate is None:
            raise ValueError("merge needs the task gate: the token gate mixes experts per token")
        gate_weights = self.gate_weights(torch.tensor([task_id]))[0]  # (E,)
        for layer in self.adapted_layers().values():
            weight = layer.base_layer.weight
            weight += sign * layer.task_delta_weight(gate_weights).to(weight.dtype)

    # Training helpers.
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None):
        """Enable the base model's activation checkpointing; frozen inputs need grads to flow."""
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):  # the new name, in transformers 5.25
            base.activation_checkpointing_enable(gradient_checkpointing_kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs)
        base.enable_input_require_grads()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor]):
        own = dict((n, p) for n, p in self.named_parameters() if p.requires_grad)
        missing, unexpected = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own)
        if missing or unexpected:
            raise ValueError(
                f"adapter tensor names do not match the model: {len(missing)} missing "
                f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})"
            )
        wrong = [
            f"{n}: file {tuple(t.shape)}, model {tuple(own[n].shape)}"
            for n, t in tensors.items()
            if t.shape != own[n].shape
        ]
        if wrong:
            raise ValueError("adapter tensor shapes do not match the model: " + "; ".join(wrong))
        with torch.no_grad():
            for name, tensor in tensors.items():
                own[name].copy_(tensor)

    # Files.
    def save_adapter(self, path, task_names: list[str], tasks: list[dict] | None = None):
        """Write adapter_config.json and adapter_model.safetensors (adapter tensors only)."""
        if len(task_names) != self.adapter_config.num_tasks:
            raise ValueError(
                f"got {len(task_names)} task names for {self.adapter_config.num_tasks} tasks"
            )
        config = {
            "moelora": asdict(self.adapter_config),
            "task_names": list(task_names),
            "tasks": tasks,
            "base_model_name_or_path": getattr(self.config, "name_or_path", None),
            "target_names": self.target_names,
        }
        tensors = {n: t.contiguous() for n, t in self.adapter_state_dict().items()}
        _write_adapter(Path(path), config, tensors)

    @staticmethod
    def read_adapter_config(path) -> dict:
        config_file = Path(path) / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: is {path} a MOELoRA adapter folder?")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if "moelora" not in config:
            raise ValueError(f"{config_file} has no 'moelora' field: not a MOELoRA adapter")
        return config

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path) -> "MoELoRAModel":
        """Inject the adapter saved in `path` into `base_model`, checking that it fits."""
        saved = cls.read_adapter_config(path)
        model = cls(base_model, MoELoRAConfig(**saved["moelora"]))
        try:
            model.load_adapter_state_dict(load_file(Path(path) / WEIGHTS_NAME))
        except ValueError as error:
            raise ValueError(f"adapter {path} does not fit this base model: {error}") from None
        return model

    @torch.no_grad()
    def export_task_lora(self, task_id: int, path):
        """Write task `task_id`'s update as a standard PEFT LoRA adapter of rank r.

        sum_i w_i B_i A_i = [w_1 B_1 | ... | w_E B_E] [A_1; ...; A_E], so B' = B * w and A' = A.
        """
        if self.gate is None:
            raise ValueError("export needs the task gate: the token gate mixes experts per token")
        gate_weights = self.gate_weights(torch.tensor([task_id]))[0]  # (E,)
        tensors = {}
        for name, layer in self.adapted_layers().items():
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.detach().float().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = layer.scaled_B(gate_weights).float().contiguous()
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": getattr(self.config, "name_or_path", None),
            "r": self.adapter_config.rank,
            "lora_alpha": self.adapter_config.alpha,
            "target_modules": self.target_names,  # full names: PEFT also matches them exactly
            "bias": "none",
        }
        _write_adapter(Path(path), config, tensors)


def _matches(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _inject(base_model: nn.Module, config: MoELoRAConfig, state: RoutingState) -> list[str]:
    """Replace each targeted nn.Linear with a MoELoRALinear; return the adapted module names."""
    targets = config.target_modules or DEFAULT_TARGET_MODULES
    linear_names = [
        n for n, m in base_model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
    ]
    names = [n for n in linear_names if _matches(n, targets)]
    if not names:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(
            f"target_modules {targets!r} match no linear layer of "
            f"{type(base_model).__name__}; its linear layers are named {leaf_names}"
        )
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = base_model.get_submodule(parent_name)
        setattr(parent, child_name, MoELoRALinear(getattr(parent, child_name), config, state))
    return names


def _write_adapter(path: Path, config: dict, tensors: dict[str, torch.Tensor]):
    """Write both adapter files into `path` through a temporary folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    # mkdtemp and safetensors create private files; adapters get the usual modes.
    tmp.chmod(0o755)
    for file in tmp.iterdir():
        file.chmod(0o644)
    if not path.exists():
        tmp.rename(path)
        return
    # The folder may hold other files (a training run's checkpoints): replace just these two,
    # the config last, so a reader never sees a new config beside old weights.
    (tmp / WEIGHTS_NAME).replace(path / WEIGHTS_NAME)
    (tmp / CONFIG_NAME).replace(path / CONFIG_NAME)
    tmp.rmdir()
