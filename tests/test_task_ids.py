"""task_ids are validated once per call: never truncated, repeated, or silently cast."""

import pytest
import torch
from tiny_models import random_batch, tiny_llama

from molora import MoLoRAConfig, get_molora_model


def _model(router="task", **kwargs):
    cfg = MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router=router, num_tasks=3, **kwargs)
    return get_molora_model(tiny_llama(), cfg)


@pytest.mark.parametrize(
    "task_ids, message",
    [
        ([0.9, 1.7], r"entries must be ints or task names, got 0.9"),
        (torch.tensor([0.9, 1.7]), r"must be an integer tensor, got dtype torch.float32"),
        (torch.tensor([True, False]), r"must be an integer tensor, got dtype torch.bool"),
        ([True, False], r"entries must be ints or task names, got True"),
        ([1], r"one id per sequence: batch size 2, got 1 ids"),
        ([0, 1, 2], r"one id per sequence: batch size 2, got 3 ids"),
        ([0, 3], r"must be in \[0, num_tasks=3\), got values in \[0, 3\]"),
        ([-1, 0], r"must be in \[0, num_tasks=3\), got values in \[-1, 0\]"),
        (["sort", "nope"], r"unknown task 'nope'; task names: \['sort', 'reverse', 'copy'\]"),
    ],
)
def test_bad_task_ids_are_rejected(task_ids, message):
    model = _model(task_names=["sort", "reverse", "copy"])
    with pytest.raises(ValueError, match=message):
        model(input_ids=random_batch()["input_ids"], task_ids=task_ids)


def test_task_ids_by_name_equal_ids():
    model = _model(task_names=["sort", "reverse", "copy"])
    ids = random_batch()["input_ids"]
    by_name = model(input_ids=ids, task_ids=["copy", "sort"]).logits
    torch.testing.assert_close(model(input_ids=ids, task_ids=torch.tensor([2, 0])).logits, by_name, rtol=0, atol=0)


def test_names_need_task_names():
    with pytest.raises(ValueError, match=r"unknown task 'sort'; task names: none"):
        _model()(input_ids=random_batch()["input_ids"], task_ids=["sort", "sort"])


@pytest.mark.parametrize("router", ["task", "topk"])
def test_empty_batch_does_not_divide_by_zero(router):
    """(Llama itself cannot run an empty batch, so the MoLoRA layer is called as the model would.)"""
    model = _model(router)
    model._set_routing(torch.zeros(0, dtype=torch.long), batch_size=0)
    layer = next(iter(model.molora_layers().values()))
    out = layer(torch.randn(0, 5, layer.in_features))
    assert out.shape == (0, 5, layer.out_features)


def test_generate_expands_task_ids_for_beams_and_returned_sequences():
    model = _model()
    ids = random_batch()["input_ids"][:, :4]
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    beams = model.generate(ids, task_ids=[2, 0], num_beams=3, num_return_sequences=3, **kw)
    assert beams.shape[0] == 6
    for row in range(2):
        alone = model.generate(ids[row : row + 1], task_ids=[[2, 0][row]], num_beams=3, num_return_sequences=3, **kw)
        torch.testing.assert_close(beams[3 * row : 3 * row + 3], alone)
