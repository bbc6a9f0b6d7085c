"""data.packing, data.eval_split and data.chat_template."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_llama

from molora import MoLoRAConfig, get_molora_model
from molora.training.data import IGNORE_INDEX, MultitaskCollator, eval_carve_out, pack_rows, tokenize_causal_lm, tokenize_chat
from molora.training.data.templates import CHAT_TEMPLATES, check_chat_template
from molora.training.objective import micro_batch_loss
from molora.training.run_config import RunConfigError, load_run_config
from molora.training.tokenizer import build_byte_tokenizer


def _rows(n: int = 6, vocab: int = 128) -> Dataset:
    """Prompt/response rows of different lengths whose bytes stay inside a tiny vocab."""
    words = ["ab", "cde", "f", "ghij", "kl", "mnopq", "rs", "t"]
    return Dataset.from_dict(
        {"prompt": [f"{words[i % 8]}=" for i in range(n)], "response": [words[(i + 3) % 8] * (1 + i % 3) for i in range(n)]}
    )


def _ce(model, batch) -> tuple[float, float]:
    """(summed cross-entropy, targets) of a batch through the training objective."""
    targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    _, stats = micro_batch_loss(model, model, batch, causal=True, step_targets=targets, grad_accum=1)
    return float(stats[0]), float(stats[1])


def _base(kind: str):
    if kind == "gpt2":
        from transformers import AutoModelForCausalLM, GPT2Config

        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=260, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    return tiny_llama(attn_implementation=kind, vocab_size=260)


@pytest.mark.parametrize("kind", ["sdpa", "eager", "gpt2"])
def test_a_packed_batch_has_the_loss_of_its_rows(kind):
    tok = build_byte_tokenizer()
    rows = tokenize_causal_lm(_rows(), tok, max_length=32)
    packed = pack_rows(rows, max_length=24)
    assert len(packed) < len(rows)  # it packed
    assert sum(len(p) for p in packed["input_ids"]) == sum(len(r) for r in rows["input_ids"])
    targets = ["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj"]
    model = get_molora_model(_base(kind), MoLoRAConfig(target_modules=targets, num_experts=2, r=2, router="topk", top_k=1, router_aux_loss_coef=0.0))
    # B != 0, so that the experts take part
    for layer in model.molora_layers().values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    model.eval()
    collate = MultitaskCollator(pad_token_id=0)
    with torch.no_grad():
        unpacked = _ce(model, collate([rows[i] for i in range(len(rows))]))
        packed_ce = _ce(model, collate([packed[i] for i in range(len(packed))]))
    assert packed_ce[1] == unpacked[1]
    assert packed_ce[0] == pytest.approx(unpacked[0], rel=1e-5)


def test_packing_without_position_ids_would_cross_rows():
    """The check above can fail: the same packed batch with a plain mask attends across rows."""
    tok = build_byte_tokenizer()
    rows = tokenize_causal_lm(_rows(), tok, max_length=32)
    packed = pack_rows(rows, max_length=24)
    model = get_molora_model(tiny_llama(vocab_size=260), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router="soft", router_aux_loss_coef=0.0))
    collate = MultitaskCollator(pad_token_id=0)
    batch = collate([{k: v for k, v in packed[i].items() if k != "position_ids"} for i in range(len(packed))])
    with torch.no_grad():
        crossing = _ce(model, batch)[0]
        unpacked = _ce(model, collate([rows[i] for i in range(len(rows))]))[0]
    assert abs(crossing - unpacked) > 1e-3


def test_pack_rows_keeps_rows_whole_with_restarting_positions():
    ds = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], "labels": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]})
    packed = pack_rows(ds, max_length=5)
    assert packed["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert packed["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert packed["labels"] == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]]


def test_eval_carve_out_is_seeded_and_disjoint():
    ds = Dataset.from_dict({"x": list(range(40))})
    train, held = eval_carve_out(ds, 0.1, seed=3)
    again = eval_carve_out(ds, 0.1, seed=3)[1]
    assert len(held) == 4 and len(train) == 36
    assert held["x"] == again["x"] and set(held["x"]).isdisjoint(train["x"])
    assert eval_carve_out(ds, 0.1, seed=4)[1]["x"] != held["x"]
    with pytest.raises(ValueError, match="at least 2 rows"):
        eval_carve_out(ds.select([0]), 0.5, seed=0)


def _config(tmp_path, **overrides):
    rows = [{"prompt": f"p{i}=", "response": f"r{i}"} for i in range(20)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = {
        "model.from_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260},
        "model.tokenizer": "byte", "molora.target_modules": ["q_proj"], "data.tasks": {"a": str(path), "b": str(path)},
        "data.cache_dir": str(tmp_path / "cache"), **overrides,
    }
    return load_run_config(None, values)


def test_eval_split_carves_an_eval_set_per_task(tmp_path):
    from molora.training.loaders import build_datasets

    config = _config(tmp_path, **{"data.eval_split": 0.25})
    mixed, evals = build_datasets(config, build_byte_tokenizer())
    assert sorted(evals) == ["a", "b"] and all(len(e) == 5 for e in evals.values())
    assert len(mixed) == 30  # 15 training rows per task
    assert set(evals["a"]["task_ids"]) == {0} and set(evals["b"]["task_ids"]) == {1}
    # each task's carve-out has its own seed: the same file gives two different eval sets
    assert evals["a"]["input_ids"] != evals["b"]["input_ids"]


@pytest.mark.parametrize("key,value,expected", [
    ("data.eval_split", 1.5, "'data.eval_split' must be a fraction in (0, 1)"),
    ("data.chat_template", "chatlm", "must be one of ['chatml', 'gemma', 'llama3', 'phi3', 'zephyr'] or a Jinja template string, got 'chatlm'"),
    ("data.chat_template", "{% for m in messages %}", "'data.chat_template' is not a valid Jinja template"),
    ("train.report_to", ["wandb"], "'train.report_to[0]' must be one of ['tensorboard'], got 'wandb'"),
    ("train.eval_samples", -1, "'train.eval_samples' must be >= 0, got -1"),
])
def test_new_keys_are_validated(tmp_path, key, value, expected):
    with pytest.raises(RunConfigError) as e:
        _config(tmp_path, **{key: value})
    assert expected in str(e.value)


def test_packing_needs_causal_lm(tmp_path):
    with pytest.raises(RunConfigError, match="'data.packing' packs causal-LM rows"):
        _config(tmp_path, **{"data.packing": True, "model.task_type": "sequence_classification", "model.num_labels": 2})


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_named_chat_template_supervises_the_assistant_turns(tmp_path, name):
    from molora.training.tokenizer import load_tokenizer

    tok = load_tokenizer(_config(tmp_path, **{"data.chat_template": name}))
    assert tok.chat_template == CHAT_TEMPLATES[name]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]
    ds = tokenize_chat(Dataset.from_dict({"messages": [messages]}), tok)
    supervised = tok.decode([t for t in ds[0]["labels"] if t != IGNORE_INDEX])
    assert supervised.startswith("yo") and "ok" in supervised and "hi" not in supervised and "more" not in supervised


def test_a_jinja_chat_template_is_used_and_a_tokenizer_template_wins(tmp_path):
    from molora.training.tokenizer import load_tokenizer

    jinja = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    assert check_chat_template(jinja) is None
    tok = load_tokenizer(_config(tmp_path, **{"data.chat_template": jinja}))
    assert tok.chat_template == jinja
    ds = tokenize_chat(Dataset.from_dict({"messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]}), tok)
    assert tok.decode([t for t in ds[0]["labels"] if t != IGNORE_INDEX]) == "a\n"


def test_a_template_with_generation_blocks_is_masked_by_its_markers():
    """A template that rewrites earlier turns (a turn count up front) is refused without markers,
    and supervised by its {% generation %} blocks with them."""
    tok = build_byte_tokenizer()
    head = "{{ '[' + (messages | length | string) + ']' }}"
    turn = "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A: ' }}{0}{% else %}{{ 'U: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
    gen = "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "r"}, {"role": "assistant", "content": "a2"}]
    rows = Dataset.from_dict({"messages": [messages]})
    tok.chat_template = head + turn.replace("{0}", "{{ m['content'] + '\\n' }}") + gen
    with pytest.raises(ValueError, match="prefixes"):
        tokenize_chat(rows, tok)
    tok.chat_template = head + turn.replace("{0}", "{% generation %}{{ m['content'] + '\\n' }}{% endgeneration %}") + gen
    ds = tokenize_chat(rows, tok)
    assert tok.decode([t for t in ds[0]["labels"] if t != IGNORE_INDEX]) == "a1\na2\n"
