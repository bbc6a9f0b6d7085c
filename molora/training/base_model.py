"""The base model of a training run: loaded from a folder, or built with random weights from
``model.from_config`` and then kept in the run folder so that adapters can name their base;
quantized with bitsandbytes and prepared for k-bit training under ``model.quantization`` (QLoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from molora.atomic import atomic_directory
from molora.training.run_config import RunConfig
from molora.training.quiet import quiet_bitsandbytes_import

__all__ = [
    "BASE_MODEL_DIR",
    "check_model_folder",
    "check_positions",
    "check_vocab",
    "keep_base_with_run",
    "load_base_model",
    "load_pretrained",
    "model_class",
    "prepare_quantized_base",
]

BASE_MODEL_DIR = "base_model"


def load_base_model(config: RunConfig, tokenizer) -> torch.nn.Module:
    """Load (``model.name_or_path``) or build (``model.from_config``) the base model.

    Args:
        config: the run config; its ``model`` section picks the auto class (causal LM or
            sequence classification), dtype, attention implementation and labels.
        tokenizer: gives the pad token id when the model config has none.

    Returns:
        The ``transformers`` model.
    """
    import transformers

    m = config.model
    auto = (
        transformers.AutoModelForCausalLM
        if m.task_type == "causal_lm"
        else transformers.AutoModelForSequenceClassification
    )
    kwargs: dict[str, Any] = {}
    if m.num_labels is not None:
        kwargs["num_labels"] = m.num_labels
    if m.attn_implementation is not None:
        kwargs["attn_implementation"] = m.attn_implementation
    dtype = None if m.dtype == "auto" else getattr(torch, m.dtype)
    if m.from_config is not None:
        hf_config = _config_from_dict(dict(m.from_config), kwargs)
        model = auto.from_config(hf_config, dtype=dtype or torch.float32)
    else:
        if m.quantization is not None:
            kwargs.update(_quantized_loading(m.quantization))
        model = load_pretrained(
            auto, m.name_or_path, "model.name_or_path", dtype=dtype or "auto", trust_remote_code=m.trust_remote_code, **kwargs
        )
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last token with it
    return model


def check_model_folder(name_or_path: str, field: str) -> None:
    """A local model folder must hold safetensors weights: molora never unpickles (DESIGN §8).

    Raises:
        ValueError: the folder holds only pickle weights (``*.bin``, ``*.pt``, ``*.pth``).
    """
    folder = Path(name_or_path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pattern))
    if pickles:
        raise ValueError(
            f"{field}={name_or_path!r} holds pickle weights only ({', '.join(pickles[:3])}), which molora does not "
            "load (unpickling runs code): save the model with save_pretrained(..., safe_serialization=True) first"
        )


def model_class(name: Any, field: str):
    """The transformers model class called ``name`` (a config's ``architectures`` entry).

    Raises:
        ValueError: ``name`` is not a transformers model class (a config, a tokenizer, a function...).
    """
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"{field}={name!r} is not a transformers model class (e.g. 'LlamaForCausalLM'); fix the base model's config.json"
        )
    return cls


def load_pretrained(cls, name_or_path: str, field: str, **kwargs) -> torch.nn.Module:
    """``cls.from_pretrained(name_or_path, use_safetensors=True, **kwargs)``, its errors as one
    ValueError naming ``field`` and the folder.

    Raises:
        ValueError: pickle-only weights (:func:`check_model_folder`), or the model could not be loaded.
    """
    check_model_folder(name_or_path, field)
    try:
        return cls.from_pretrained(name_or_path, use_safetensors=True, **kwargs)
    except ImportError:
        raise  # a missing optional package says which one
    except Exception as e:  # noqa: BLE001 - transformers, safetensors and torch raise many types for a bad folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{field}={name_or_path!r}: cannot load the base model with {cls.__name__} ({type(e).__name__}: {first[:300]}); "
            "it must be a transformers model folder (config.json and *.safetensors) or a model id"
        ) from e


def _config_from_dict(cfg: dict[str, Any], kwargs: dict[str, Any]):
    """``AutoConfig.for_model`` of ``model.from_config``.

    Raises:
        ValueError: no or an unknown ``model_type`` (with the closest known ones).
    """
    import difflib

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = cfg.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        hint = f"; did you mean {close}?" if close else " (e.g. llama, mistral, qwen2, gpt2)"
        raise ValueError(f"model.from_config.model_type={model_type!r} is not a transformers model type{hint}")
    return AutoConfig.for_model(model_type, **cfg, **kwargs)


def check_vocab(model: torch.nn.Module, tokenizer, config: RunConfig) -> None:
    """A model built from config has an embedding row for every token id the tokenizer makes
    (a pretrained model is not checked: its tokenizer may count tokens the data never uses).

    Raises:
        ValueError: ``model.from_config.vocab_size`` is smaller than the tokenizer.
    """
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if config.model.from_config is None or rows is None or len(tokenizer) <= rows:
        return
    field = "model.from_config.vocab_size"
    raise ValueError(
        f"{field}={rows} is smaller than the tokenizer's {len(tokenizer)} tokens "
        f"(model.tokenizer={config.model.tokenizer or config.model.name_or_path!r}): ids >= {rows} have no embedding; "
        f"set {field} >= {len(tokenizer)}"
    )


_LEARNED_POSITIONS = ("wpe", "position_embeddings", "embed_positions", "pos_emb")  # GPT-2, BERT, OPT, ...


def check_positions(model: torch.nn.Module, max_length: int, warn) -> None:
    """``data.max_length`` against the positions the model knows (``max_position_embeddings``
    or ``n_positions``): above them a model with a learned position table fails with an
    IndexError mid-run (refused here), a RoPE model extrapolates past its trained length (warned).

    Args:
        model: the base model.
        max_length: ``data.max_length``.
        warn: prints a warning line (the accelerator's print).

    Raises:
        ValueError: a learned position table shorter than ``max_length``.
    """
    cfg = getattr(model, "config", None)
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not isinstance(positions, int) or max_length <= positions:
        return
    learned = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _LEARNED_POSITIONS
    ]
    if learned:
        raise ValueError(
            f"data.max_length={max_length} is above the base model's {positions} learned positions ({learned[0]!r}): "
            f"longer sequences have no position embedding; set data.max_length <= {positions}"
        )
    warn(
        f"warning: data.max_length={max_length} is above the base model's max_position_embeddings={positions}: "
        "positions past it were never trained (RoPE extrapolates), quality may drop; lower data.max_length"
    )


def keep_base_with_run(base: torch.nn.Module, output_dir: Path, *, resuming: bool, main: bool) -> torch.nn.Module:
    """Save a base built from config into ``output_dir/base_model`` (or reload it on resume).

    A model built from config has no weights anywhere else: keeping them with the run lets
    adapters, exports and ``molora export RUN`` name and reload their base.

    Args:
        base: the freshly built base model.
        output_dir: the run folder.
        resuming: reload the saved base (exactly the run's weights) when there is one.
        main: whether this is the main process (the only one that writes).

    Returns:
        The base model, its ``config.name_or_path`` pointing at the saved folder.
    """
    base_dir = (output_dir / BASE_MODEL_DIR).resolve()
    if resuming and (base_dir / "config.json").is_file():
        base = type(base).from_pretrained(base_dir, dtype=base.dtype)  # exactly the run's base
    elif main:
        with atomic_directory(base_dir) as tmp:
            base.save_pretrained(tmp)  # atomic_directory gives its files the usual modes
    base.config.name_or_path = str(base_dir)
    return base


def prepare_quantized_base(base: torch.nn.Module, config: RunConfig) -> torch.nn.Module:
    """Under ``model.quantization``: the quantized base, prepared for k-bit training.

    A base built from config (random weights, not quantizable while building) is reloaded from
    the run folder where :func:`keep_base_with_run` kept it. The preparation is PEFT's
    ``prepare_model_for_kbit_training``: the base's non-quantized float16/bfloat16 parameters
    (norms, embeddings, head) in float32, inputs that require grad, and gradient checkpointing
    (non-reentrant, which keeps the router losses' gradients) when ``model.gradient_checkpointing``.

    Returns:
        ``base`` unchanged without ``model.quantization``.

    Raises:
        ImportError: bitsandbytes or peft is missing (``pip install 'molora[qlora]'``).
    """
    m = config.model
    if m.quantization is None:
        return base
    if not getattr(base, "is_quantized", False):  # from_config: reload the kept base quantized
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the main process has written it
        base = type(base).from_pretrained(
            base.config.name_or_path, dtype=base.dtype, **_quantized_loading(m.quantization)
        )
    try:
        from peft import prepare_model_for_kbit_training
    except ImportError as err:
        raise ImportError("'model.quantization' needs peft: pip install 'molora[qlora]'") from err
    # checkpointing is enabled later on the MoLoRA model (model.gradient_checkpointing), with the
    # method's current name: PEFT's call of the old one warns on transformers 5
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def _quantized_loading(quantization: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` kwargs of a bitsandbytes base: its config and this process's device."""
    import transformers

    quiet_bitsandbytes_import()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError("'model.quantization' needs bitsandbytes: pip install 'molora[qlora]'") from err
    from accelerate import PartialState

    q = dict(quantization)
    if "bnb_4bit_compute_dtype" in q:
        q["bnb_4bit_compute_dtype"] = getattr(torch, q["bnb_4bit_compute_dtype"])
    if "bnb_4bit_quant_storage" in q:
        q["bnb_4bit_quant_storage"] = getattr(torch, q["bnb_4bit_quant_storage"])
    # a quantized model cannot be moved after loading: load it on the device this process trains on
    return {"quantization_config": transformers.BitsAndBytesConfig(**q), "device_map": {"": PartialState().device}}
