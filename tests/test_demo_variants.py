"""``molora demo --variants``: the compared forms, their budget, and the mean +- std table."""

from __future__ import annotations

import pytest

from molora.apps.demo.config import DemoConfig
from molora.apps.demo.models import VARIANT_MODELS, _molora_config, hydra_rank
from molora.apps.demo.variants import _summarize, format_variants


class _Task:
    def __init__(self, name):
        self.name = name


def test_variant_configs_keep_the_adapter_budget():
    cfg, tasks = DemoConfig(), [_Task("a"), _Task("b"), _Task("c")]
    d, n, r = 384, cfg.num_experts, cfg.r
    budget = n * r * 2 * d  # N experts of rank r on a square (d, d) layer
    sizes = {}
    for key in VARIANT_MODELS:
        if key == "shared-lora":
            continue
        c = _molora_config(key, tasks, cfg)
        a_count = 1 if c.share_lora_A else c.num_experts
        sizes[key] = c.r * d * (a_count + c.num_experts) + c.num_shared_experts * c.r * 2 * d
    same_budget = ("molora-task", "molora-topk", "molora-topp", "task-shared1", "task-dora", "task-pissa", "topk-pissa")
    assert {sizes[k] for k in same_budget} == {budget}
    assert abs(sizes["hydra-task"] - budget) / budget < 0.1 and hydra_rank(cfg) == 6
    assert _molora_config("molora-topp", tasks, cfg).router == "topp"


def test_dora_and_pissa_forms_differ_from_their_plain_forms_only_in_the_variant():
    cfg, tasks = DemoConfig(), [_Task("a"), _Task("b"), _Task("c")]
    plain_task, plain_topk = _molora_config("molora-task", tasks, cfg), _molora_config("molora-topk", tasks, cfg)
    for key, plain, changed in [
        ("task-dora", plain_task, {"use_dora": True}),
        ("task-pissa", plain_task, {"init_lora_weights": "pissa"}),
        ("topk-pissa", plain_topk, {"init_lora_weights": "pissa"}),
    ]:
        got = _molora_config(key, tasks, cfg).to_dict()
        want = {**plain.to_dict(), **changed}
        assert got == want, key


def test_variants_table_gives_mean_and_std_over_seeds():
    runs = [
        {"seed": s, "accuracy": {"a": acc, "b": acc}, "mean_accuracy": acc, "trainable_params": 10, "train_s": 1.0}
        for s, acc in enumerate([0.5, 0.7])
    ]
    section = {"seeds": [0, 1], "tasks": ["a", "b"], "models": {k: {"runs": list(runs)} for k in VARIANT_MODELS}}
    _summarize(section)
    entry = section["models"]["hydra-task"]
    assert entry["mean"] == pytest.approx(0.6) and entry["std"] == pytest.approx(0.1414, abs=1e-4)
    table = format_variants(section)
    assert "| hydra-task (HydraLoRA (shared A), task router) | 0.600 | 0.600 | 0.600 ± 0.141 | 10 |" in table
    assert table.count("\n| ") == len(VARIANT_MODELS) + 1  # header + one row per form


def test_variants_forms_must_be_known(tmp_path):
    from molora.apps.demo.variants import run_variants

    with pytest.raises(ValueError, match=r"`forms` must be keys of the variant forms, got \['moe'\]"):
        run_variants(DemoConfig(), None, None, tmp_path, seeds=1, progress=False, forms=["shared-lora", "moe"])
