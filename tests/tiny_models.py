"""Tiny transformers models built from config (no download), shared by the tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

VOCAB = 128


def tiny_llama_config(**overrides) -> LlamaConfig:
    """The project's standard tiny Llama config (2 layers, hidden 32, vocab 128)."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    return LlamaConfig(**{**kwargs, **overrides})


def tiny_llama(seed: int = 0, *, cls=AutoModelForCausalLM, **overrides) -> torch.nn.Module:
    """A seeded tiny Llama in eval mode; ``cls`` picks the head (``AutoModelForCausalLM`` or a
    Llama*For* class), ``overrides`` change the config."""
    torch.manual_seed(seed)
    config = tiny_llama_config(**overrides)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return model.eval()


def tiny_gpt2(seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded tiny GPT-2 (Conv1D layers) in eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
    config = GPT2Config(vocab_size=VOCAB, **{**kwargs, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def random_batch(batch: int = 2, seq: int = 9, seed: int = 1, pad_last: int = 0) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (the last `pad_last` positions of row 0 padded) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[0, -pad_last:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_steps(model, batch, *, steps: int = 1, lr: float = 1e-2, **forward_kwargs) -> list[float]:
    """Take `steps` AdamW steps on one batch; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(**batch, **forward_kwargs)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    return losses


def trained(model, ids: torch.Tensor, task_ids: torch.Tensor | None = None, *, steps: int = 1, lr: float = 0.05):
    """``model`` after ``steps`` AdamW steps of language modeling on ``ids`` (so that B, the
    magnitudes and the routers differ from their init before a merge or export), in eval mode."""
    train_steps(model, {"input_ids": ids, "labels": ids}, steps=steps, lr=lr, task_ids=task_ids)
    return model
