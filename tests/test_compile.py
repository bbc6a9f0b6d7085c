"""The forward makes no host-device sync: one graph under torch.compile (DESIGN §8, STYLE 18).

A training forward (labels, router losses on, padding) of a tiny Llama must trace with zero
graph breaks on every router and every expert path, and a compiled training step must give the
losses of the eager one. The compiled steps use the ``aot_eager`` backend: it runs Dynamo and
AOTAutograd (the whole-graph capture, the custom ops' fake implementations, the backward of the
autograd Functions) without Inductor's C++ compile, which takes ~40 s per model on CPU;
``molora bench train --compile`` runs Inductor.
"""

import pytest
import torch
from tiny_models import random_batch, tiny_llama

from molora import MoLoRAConfig, get_molora_model

ROUTERS = {
    "soft": dict(router="soft"),
    "topk1": dict(router="topk", top_k=1),
    "topk2": dict(router="topk", top_k=2),
    "task": dict(router="task", num_tasks=3),
    "task_topk": dict(router="task", num_tasks=3, top_k=2),
    "topp": dict(router="topp", top_p=0.5),
    "topp_cap": dict(router="topp", top_p=0.7, top_k=2),
    "topk2_block": dict(router="topk", top_k=2, router_sharing="block"),
    "task_block": dict(router="task", num_tasks=3, router_sharing="block"),
    "task_dora": dict(router="task", num_tasks=3, top_k=2, use_dora=True),
    "task_pissa": dict(router="task", num_tasks=3, init_lora_weights="pissa"),
    "soft_pissa": dict(router="soft", init_lora_weights="pissa"),
}
# A cross that runs every router and every path (explain costs ~3 s per model); "auto" runs
# with one thread and enough tokens that it picks a sparse path (grouped) rather than dense.
CROSS = [
    ("soft", "dense"),
    ("soft", "grouped"),
    ("topk1", "grouped"),
    ("topk2", "hybrid"),
    ("topk2", "auto"),
    ("task", "hybrid"),
    ("task_topk", "grouped"),
    ("topp", "grouped"),
    ("topp", "dense"),
    ("topp_cap", "hybrid"),
    ("topk2_block", "grouped"),
    ("task_block", "dense"),
    ("task_dora", "hybrid"),
    ("task_pissa", "dense"),
    ("soft_pissa", "grouped"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model_and_batch(router: str, impl: str, *, layers: int = 2):
    cfg = MoLoRAConfig(
        target_modules=["q_proj", "v_proj", "gate_proj"],
        num_experts=4,
        r=4,
        expert_impl=impl,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        **ROUTERS[router],
    )
    model = get_molora_model(tiny_llama(num_hidden_layers=layers), cfg).train()
    batch = random_batch(batch=4, seq=12, pad_last=3)  # 48 tokens: top-2 "auto" goes sparse
    if router.startswith("task"):
        batch["task_ids"] = torch.tensor([0, 2, 1, 2])
    return model, batch


@pytest.mark.parametrize("router, impl", CROSS, ids=[f"{r}-{i}" for r, i in CROSS])
def test_training_forward_has_no_graph_break(router, impl):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # "auto" on CPU: sparse with one thread
    try:
        model, batch = _model_and_batch(router, impl)
        explained = torch._dynamo.explain(model)(**batch)
    finally:
        torch.set_num_threads(threads)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("router, impl", [("topk2", "grouped"), ("task", "dense")])
def test_compiled_training_step_matches_eager(router, impl):
    """Same losses and routing statistics (accumulated on the device) as eager; for the task
    router, out-of-range ids raise from inside the compiled graph."""

    def run(compiled: bool):
        torch._dynamo.reset()
        model, batch = _model_and_batch(router, impl, layers=1)
        step = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(3):
            loss = step(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, model.routing_stats(), step, batch

    eager, eager_stats, _, _ = run(False)
    compiled, compiled_stats, step, batch = run(True)
    assert eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    real_tokens = 3 * int(batch["attention_mask"].sum())
    for name, stats in compiled_stats.items():
        assert stats["tokens"] == eager_stats[name]["tokens"] == real_tokens
        torch.testing.assert_close(stats["load"], eager_stats[name]["load"])
        torch.testing.assert_close(stats["gates"], eager_stats[name]["gates"])
    if router == "task":
        batch["task_ids"] = torch.tensor([0, 3, 1, 2])
        with pytest.raises(RuntimeError, match=r"`task_ids` must be in \[0, num_tasks=3\)"):
            step(**batch)
