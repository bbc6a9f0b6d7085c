"""`molora bench recipes`: the choice uses the eval metric over every final seed, and a quick
sweep runs end to end on the tiny causal-LM task set (no timing assertions)."""

import argparse
import json

import pytest

from molora.apps.bench import recipes
from molora.apps.demo.config import DemoConfig, router_recipe


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from intra-op threads (busy shared cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _case(router, ratio, aux, seed, eval_, test, suite="demo"):
    return {"suite": suite, "steps": 60, "router": router, "ratio": ratio, "aux": aux, "seed": seed, "eval": eval_, "test": test}


def test_choice_is_the_best_mean_eval_not_the_best_test():
    cases = [
        # ratio 20: best eval mean (0.8), worse test
        *(_case("task", 20.0, 0.0, s, e, 0.5) for s, e in enumerate([0.7, 0.8, 0.9])),
        # ratio 1: best test, worse eval
        *(_case("task", 1.0, 0.0, s, 0.6, 0.99) for s in range(3)),
        # ratio 50: a higher eval on one seed only (a screening run): cannot be chosen
        _case("task", 50.0, 0.0, 0, 0.95, 0.9),
    ]
    settings = recipes.summarize(cases)["demo@60"]["task"]
    assert settings["20|0"]["eval"] == pytest.approx(0.8)
    assert settings["20|0"]["eval_std"] == pytest.approx(0.1)
    chosen = recipes.choose(settings, [0, 1, 2])
    assert (chosen["ratio"], chosen["aux"]) == (20.0, 0.0)
    # with one final seed the single-seed ratio 50 wins on its eval
    assert recipes.choose(settings, [0])["ratio"] == 50.0
    table = recipes.format_table(recipes.summarize(cases), [0, 1, 2], {"demo@60": "accuracy"})
    assert "| **task** | 20 | 0 | 3 | 0.800 ± 0.100 | **0.500 ± 0.000** |" in table
    assert "| task | 1 | 0 | 3 | 0.600 ± 0.000 | 0.990 ± 0.000 |" in table
    assert "| task | 50 | 0 | 1 | 0.950 | 0.900 |" in table  # one seed: no std


def test_ties_go_to_the_smaller_ratio_then_aux():
    cases = [_case("topk", r, a, 0, 0.5, 0.5) for r in (5.0, 1.0) for a in (0.01, 0.0)]
    chosen = recipes.choose(recipes.summarize(cases)["demo@60"]["topk"], [0])
    assert (chosen["ratio"], chosen["aux"]) == (1.0, 0.0)


def test_quick_sweep_writes_json_and_table(tmp_path, capsys, one_thread):
    parser = argparse.ArgumentParser()
    recipes.add_arguments(parser)
    out, md = tmp_path / "recipes.json", tmp_path / "recipes.md"
    args = parser.parse_args(["--quick", "--suites", "lm", "--out", str(out), "--markdown", str(md)])
    assert recipes.run(args) == 0
    results = json.loads(out.read_text())
    assert {(c["router"], c["ratio"]) for c in results["cases"]} == {("task", 1.0), ("task", 20.0)}
    settings = recipes.summarize(results["cases"])["lm@4"]["task"]
    best = max(settings.values(), key=lambda s: (s["eval"], -s["ratio"]))
    assert results["chosen"]["lm@4"]["task"]["ratio"] == best["ratio"]
    assert "| router | lr ratio | aux | seeds | eval | test |" in md.read_text()
    # a second run finds every case in the JSON and trains nothing
    capsys.readouterr()
    assert recipes.run(parser.parse_args(["--quick", "--suites", "lm", "--out", str(out)])) == 0
    assert " seed 0: eval " not in capsys.readouterr().out


def test_demo_router_recipe_defaults_and_overrides():
    cfg = DemoConfig()
    assert router_recipe("task", cfg)[0] > 1  # the task table needs its own lr
    assert router_recipe("topk", DemoConfig(router_lr_ratio=3.0, router_aux_loss_coef=0.0)) == (3.0, 0.0)
    with pytest.raises(ValueError, match="unknown router kind 'moe'"):
        router_recipe("moe", cfg)
    with pytest.raises(ValueError, match="`router_lr_ratio` must be None or > 0, got 0"):
        DemoConfig(router_lr_ratio=0)
