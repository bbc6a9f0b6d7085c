"""MoLoRAConfig validation (field, value, allowed range) and JSON round trip."""

import pytest

from molora import MoLoRAConfig


def test_defaults_and_json_round_trip(tmp_path):
    cfg = MoLoRAConfig(target_modules=["q_proj"], router="topk")
    assert cfg.top_k == 2 and cfg.scaling == 2.0
    assert MoLoRAConfig(r=16, lora_alpha=16, use_rslora=True).scaling == pytest.approx(4.0)
    task = MoLoRAConfig(router="task", num_tasks=3, task_names=["a", "b", "c"], top_k=None)
    assert task.top_k is None
    task.save(tmp_path / "c.json")
    assert MoLoRAConfig.load(tmp_path / "c.json") == task


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 9}, r"`top_k` must be in \[1, num_experts=8\], got 9"),
        ({"num_experts": 0}, r"`num_experts` must be an int >= 1, got 0"),
        ({"r": 2.5}, r"`r` must be an int >= 1, got 2.5"),
        ({"lora_dropout": 1.0}, r"`lora_dropout` must be in \[0, 1\), got 1.0"),
        ({"router": "hash"}, r"`router` must be one of \['soft', 'task', 'topk', 'topp'\], got 'hash'"),
        ({"router": "task"}, r"`num_tasks` must be an int >= 1 for router='task', got None"),
        ({"router": "soft", "top_k": 2}, r"`top_k` must be None for router='soft'"),
        ({"expert_impl": "cuda"}, r"`expert_impl` must be one of \[.*'grouped'.*\], got 'cuda'"),
        ({"target_modules": []}, r"`target_modules` must be a non-empty list"),
        ({"router_aux_loss_coef": -1}, r"`router_aux_loss_coef` must be a number >= 0, got -1"),
        ({"router": "task", "num_tasks": 2, "task_names": ["a"]}, r"`task_names` must have num_tasks=2 entries, got 1"),
    ],
)
def test_bad_values_name_field_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoLoRAConfig(**kwargs)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as err:
        MoLoRAConfig(r=0, lora_alpha=-1, router="nope")
    text = str(err.value)
    assert "`r`" in text and "`lora_alpha`" in text and "`router`" in text


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match=r"unknown MoLoRAConfig keys \['num_expert'\]"):
        MoLoRAConfig.from_dict({"num_expert": 4})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"use_rslora": "false"}, r"`use_rslora` must be True or False, got 'false' \(str\)"),
        ({"debug": 1}, r"`debug` must be True or False, got 1 \(int\)"),
        ({"lora_alpha": float("inf")}, r"`lora_alpha` must be > 0, got inf \(numbers must be finite\)"),
        ({"router_z_loss_coef": float("nan")}, r"`router_z_loss_coef` must be a number >= 0, got nan"),
        ({"num_experts": True}, r"`num_experts` must be an int >= 1, got True"),
        ({"target_modules": "q_proj(("}, r"`target_modules` is not a valid regular expression: 'q_proj\(\('"),
        ({"normalize_top_k": "yes"}, r"`normalize_top_k` must be None, True or False, got 'yes'"),
        ({"router": "task", "num_tasks": 2, "task_names": ["x", "x"]}, r"entries 'x' and 'x' collide"),
        ({"router": "task", "num_tasks": 2, "task_names": ["a b", "a_b"]}, r"entries 'a b' and 'a_b' collide"),
        ({"router": "task", "num_tasks": 2, "task_names": ["a", "merge_report.json"]}, r"'merge_report.json' is not allowed"),
        ({"router": "task", "num_tasks": 2, "task_names": ["a", "all"]}, r"'all' is not allowed"),
        ({"router": "task", "num_tasks": 2, "task_names": ["a", "7"]}, r"'7' is not allowed"),
    ],
)
def test_values_that_used_to_pass_silently(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoLoRAConfig(**kwargs)


def test_a_field_changed_after_construction_is_validated_again():
    cfg = MoLoRAConfig(router="topk", top_k=2)
    with pytest.raises(ValueError, match=r"(?s)`top_k` must be in \[1, num_experts=8\], got 99.*change of `top_k` was undone"):
        cfg.top_k = 99
    assert cfg.top_k == 2
    cfg.num_experts = 4  # a valid change is kept
    assert cfg.num_experts == 4
