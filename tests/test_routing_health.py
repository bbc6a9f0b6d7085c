"""Issue 16: defaults that let routing learn (router lr ratio, balancing loss per router kind),
the routing-health monitor, and reports that show specialization for dense routers."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_CONFIG
from safetensors.torch import load_file
from tiny_models import tiny_llama

from molora import MoLoRAConfig, MoLoRAModel, RoutingHealthCallback, get_molora_model, get_optimizer_param_groups
from molora.cli import main
from molora.core.recipes import AUX_LOSS_COEF, ROUTER_LR_RATIO
from molora.core.routing_health import RoutingHealthMonitor, routing_health

VOCAB = 128


def _task_model(specialized: bool) -> MoLoRAModel:
    cfg = MoLoRAConfig(
        target_modules=["q_proj", "v_proj"], num_experts=4, r=2, router="task", num_tasks=2, task_names=["a", "b"]
    )
    model = get_molora_model(tiny_llama(), cfg)
    with torch.no_grad():
        for layer in model.molora_layers().values():
            layer.router.table.zero_()  # exactly uniform
            if specialized:  # task a -> expert 0, task b -> expert 1 (gate e^8 / (e^8 + 3) = 0.999)
                layer.router.table[0, 0] = layer.router.table[1, 1] = 8.0
    return model


def _forward(model: MoLoRAModel) -> None:
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=["a", "b", "a", "b"])


def test_monitor_warns_once_when_routing_stays_uniform(caplog):
    model = _task_model(specialized=False)
    _forward(model)
    health = routing_health(model.last_routing_report())
    row = health["model.layers.0.self_attn.q_proj"]["tasks"]["a"]
    assert row["entropy"] == pytest.approx(1.0) and row["max_gate"] == pytest.approx(0.25)
    monitor = RoutingHealthMonitor(100, router="task", hint="raise the router lr")
    assert monitor.check(24, health) == []  # before 25% of the steps: no verdict yet
    with caplog.at_level(logging.WARNING, logger="molora"):
        new = monitor.check(25, health)
    assert len(new) == 1 and "still uniform at step 25/100" in new[0] and "raise the router lr" in new[0]
    assert [r.getMessage() for r in caplog.records] == new
    assert monitor.check(50, health) == []  # once


def test_monitor_is_silent_when_routing_specializes(caplog):
    model = _task_model(specialized=True)
    _forward(model)
    health = routing_health(model.last_routing_report())
    layer = health["model.layers.1.self_attn.v_proj"]
    assert layer["tasks"]["a"]["max_gate"] > 0.99 and layer["tasks"]["b"]["entropy"] < 0.01
    assert layer["all"]["dense"] and layer["all"]["dead"] == [2, 3]  # unused by both tasks: reported ...
    monitor = RoutingHealthMonitor(100, router="task")
    with caplog.at_level(logging.WARNING, logger="molora"):
        assert monitor.check(30, health) == [] and monitor.check(100, health) == []
    assert not caplog.records  # ... but a task router with fewer tasks than experts is not "collapsed"


def test_monitor_warns_when_a_token_router_collapses():
    def report(load, gates):
        return {"l0": {"all": {"load": load, "gates": gates, "tokens": 64, "entropy": 0.5, "max_gate": 0.7}, "tasks": {}}}

    balanced = routing_health(report([0.5, 0.5, 0.5, 0.5], [0.25] * 4))
    dead = routing_health(report([1.0, 1.0, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0]))
    hog = routing_health(report([1.0] * 4, [0.94, 0.02, 0.02, 0.02]))  # dense: gate mass
    assert balanced["l0"]["all"]["usage_cv"] == pytest.approx(0.0) and not balanced["l0"]["all"]["dead"]
    assert RoutingHealthMonitor(8, router="topk").check(4, balanced) == []
    monitor = RoutingHealthMonitor(8, router="topk")
    assert monitor.check(3, dead) == []  # one batch is not a collapse yet (COLLAPSE_CHECKS)
    (msg,) = monitor.check(4, dead)
    assert "collapsed at step 4/8" in msg and "experts [2, 3] are dead" in msg
    monitor = RoutingHealthMonitor(8, router="soft")
    assert monitor.check(7, hog) == []
    (msg,) = monitor.check(8, hog)
    assert "expert 0 takes 94% of the gate mass" in msg


def test_an_expert_missing_from_one_small_batch_is_not_a_collapse():
    """On a tiny run's batch an expert may be picked by no token once and come back at the next
    log step; the monitor warned at the first such batch."""

    def report(load):
        return {"l0": {"all": {"load": load, "gates": [0.25] * 4, "tokens": 16, "entropy": 0.99, "max_gate": 0.3}, "tasks": {}}}

    monitor = RoutingHealthMonitor(20, router="topk")
    one_miss = [report([1.0, 0.5, 0.5, 0.0]), report([0.75, 0.5, 0.5, 0.25]), report([1.0, 0.5, 0.5, 0.0])]
    assert [monitor.check(step, routing_health(r)) for step, r in enumerate(one_miss, start=5)] == [[], [], []]


def test_near_uniform_probabilities_of_a_sparse_router_are_not_uniform_routing():
    """A top-k router with probabilities near 1/N still picks experts per token (its choice follows
    small logit differences): its experts do not act as one LoRA, and the advice to raise the
    router lr contradicted its recipe (1x). The default tiny top-k run printed that warning."""

    def report(load):
        return {"l0": {"all": {"load": load, "gates": [0.25] * 4, "tokens": 64, "entropy": 0.995, "max_gate": 0.29}, "tasks": {}}}

    sparse = routing_health(report([0.9, 0.5, 0.4, 0.2]))  # top-2: load sums to 2
    dense = routing_health(report([1.0] * 4))  # soft: every expert on every token
    assert not sparse["l0"]["all"]["dense"] and dense["l0"]["all"]["dense"]
    assert RoutingHealthMonitor(8, router="topk").check(4, sparse) == []
    (msg,) = RoutingHealthMonitor(8, router="soft").check(4, dense)
    assert "still uniform at step 4/8" in msg


def test_routing_health_callback_logs_metrics_and_warns(caplog):
    callback = RoutingHealthCallback()
    model = _task_model(specialized=False)
    _forward(model)
    state = SimpleNamespace(max_steps=8, global_step=4, log_history=[{"loss": 1.0, "step": 4}])
    logs = {"loss": 1.0}
    with caplog.at_level(logging.WARNING, logger="molora"):
        callback.on_log(None, state, None, model=model, logs=logs)
        callback.on_log(None, state, None, model=model, logs={"eval_loss": 1.0})  # eval logs are skipped
    assert logs["routing/entropy"] == pytest.approx(1.0) and state.log_history[-1]["routing/max_gate"] == pytest.approx(0.25)
    assert len(callback.history) == 1 and "model.layers.0.self_attn.q_proj" in callback.history[0]["layers"]
    assert len(caplog.records) == 1 and "still uniform" in caplog.records[0].getMessage()


def test_reports_show_gate_mass_and_entropy_of_dense_routers(tmp_path, capsys):
    model = _task_model(specialized=True).eval()
    _forward(model)
    report = model.routing_report()
    row = report["model.layers.0.self_attn.q_proj"]["tasks"]["a"]
    assert row["load"] == pytest.approx([1.0] * 4)  # a dense router's load says nothing ...
    assert row["gates"][0] > 0.99 and row["entropy"] < 0.01  # ... its gates and entropy do
    model.print_routing(tmp_path / "routing.png")
    out = capsys.readouterr().out
    assert "gate mass" in out and "entropy" in out and "load balance" not in out
    assert " 99.9%" in out and "100.0%" not in out  # task a's gate on expert 0, not a 100% load


def test_defaults_per_router_kind_and_param_groups():
    assert MoLoRAConfig(router="task", num_tasks=2).router_aux_loss_coef == AUX_LOSS_COEF["task"] == 0.0
    assert MoLoRAConfig(router="topk").router_aux_loss_coef == AUX_LOSS_COEF["topk"]
    assert MoLoRAConfig(router="topk", router_aux_loss_coef=0.01).router_aux_loss_coef == 0.01
    cfg = MoLoRAConfig(router="task", num_tasks=2, router_aux_loss_coef=0.05)
    assert cfg.router_aux_loss_coef == 0.05 and MoLoRAConfig.from_dict(cfg.to_dict()) == cfg  # explicit values kept
    lr = 1e-3
    for router, extra in (("task", {"num_tasks": 2}), ("topk", {}), ("soft", {})):
        model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router=router, **extra))
        groups = {g["name"]: g for g in get_optimizer_param_groups(model, lr, loraplus_lr_ratio=4)}
        assert groups["router"]["lr"] == pytest.approx(ROUTER_LR_RATIO[router] * lr), router
        assert groups["lora_B"]["lr"] == pytest.approx(4 * lr) and groups["base"]["lr"] == lr
    # the recipe study (benchmarks/RESULTS.md): a task table wants a larger ratio than a token router
    assert all(ROUTER_LR_RATIO["task"] > ROUTER_LR_RATIO[r] >= 1 for r in ("soft", "topk", "topp"))
    groups = {g["name"]: g for g in get_optimizer_param_groups(model, lr, router_lr_ratio=3)}
    assert groups["router"]["lr"] == pytest.approx(3e-3)
    groups = {g["name"]: g for g in get_optimizer_param_groups(model, lr, router_lr_ratio=3, router_lr=7e-3)}
    assert groups["router"]["lr"] == pytest.approx(7e-3)  # an explicit router lr wins
    with pytest.raises(ValueError, match=r"`router_lr_ratio` must be a finite number > 0 or None, got -1"):
        get_optimizer_param_groups(model, lr, router_lr_ratio=-1)
    with pytest.raises(ValueError, match=r"no MoLoRA model"):
        get_optimizer_param_groups(_RouterOnly(), lr)


class _RouterOnly(torch.nn.Module):
    """A module with a router parameter and no MoLoRA model: the default ratio is unknown."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Module()
        self.block.router = torch.nn.Linear(2, 2)


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    """configs/tiny.yaml with the task router and no router setting of the user's own."""
    root = tmp_path_factory.mktemp("task_router")
    overrides = {
        "molora.router": "task",
        "molora.top_k": "null",  # tiny.yaml's top-k setting; the task router mixes all experts
        "train.output_dir": str(root / "run"),
        "data.cache_dir": str(root / "ds"),
        "train.max_steps": 30,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.log_every": 10,
        "train.max_eval_batches": 2,
        "train.export": "false",
        "train.progress_bar": "false",
    }
    assert main(["train", str(TINY_CONFIG), *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    return root / "run"


def test_task_router_learns_with_default_settings(task_run):
    """Before issue 16 the router trained at the experts' lr with the balancing loss on: on this
    run every gate stayed within 0.26 +- 0.01 (uniform: 0.25). With the defaults it specializes."""
    tables = [t for k, t in load_file(str(task_run / "final" / "molora_model.safetensors")).items() if k.endswith("router.table")]
    gates = torch.softmax(torch.stack(tables).float(), dim=-1)  # (layers, tasks, N)
    assert gates.shape[1:] == (2, 4)
    assert gates.max(-1).values.mean() > 0.4, gates.max(-1).values.mean()
    config = (task_run / "run_config.yaml").read_text()
    assert "router_aux_loss_coef: 0.0" in config and "router_lr: null" in config
    records = [json.loads(line) for line in (task_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert train[-1]["lr_router"] == pytest.approx(ROUTER_LR_RATIO["task"] * train[-1]["lr_base"])
    health = [r for r in records if r["type"] == "routing_health"]
    assert [r["step"] for r in health] == [10, 20, 30]
    assert health[-1]["summary"]["entropy"] < health[0]["summary"]["entropy"] < 1.0
    assert set(health[-1]["layers"]["model.layers.0.self_attn.q_proj"]["tasks"]) == {"reverse", "sort"}
    assert not any(r["warnings"] for r in health)


def test_inspect_shows_gate_entropy_of_a_task_router(task_run, capsys):
    assert main(["inspect", str(task_run), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "gate entropy" in out and "gate mass" in out and "load balance" not in out
