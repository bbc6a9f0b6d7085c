"""Probe cases for training: resume with changed settings, divergence, damaged training state,
hostile adapter files, bad base models, rank="auto" on expert structures (issue 17, items 5-10,
13-15, 18-20, 23).

Registered with the helpers of :mod:`probes` (see its docstring). A ``train`` case runs the tiny
config through the CLI (``run_cli``); the resume cases start from one finished 2-step run, built
once per probe session and copied into each case's own temporary folder.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tampering import CKPT, edit_trainer_state, foreign_optimizer

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from probes import api_error, case, clear_exit, cli_error, run_cli
from probes.common import TINY, tiny_llama

QUICK = {
    "train.max_steps": 2,
    "train.save_every": 2,
    "train.eval_every": 0,
    "train.warmup": 0,
    "train.log_every": 1,
    "train.batch_size": 4,
    "train.grad_accum": 1,
    "train.progress_bar": "false",
    "train.export": "false",
    "data.num_samples": 16,
}
GPT2 = "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 4, n_positions: 16, vocab_size: 260}"


def _train_args(tmp: Path, out: str = "run", **extra) -> list[str]:
    values = {**QUICK, "train.output_dir": str(tmp / out), "data.cache_dir": str(tmp / "ds_cache"), **extra}
    return ["train", TINY, *[f"{k}={v}" for k, v in values.items()]]


@functools.lru_cache(maxsize=1)
def _finished() -> Path:
    """One finished 2-step run (checkpoint at step 2), shared by the resume cases (read only)."""
    root = Path(tempfile.mkdtemp(prefix="molora-probe-run-"))
    proc = run_cli(_train_args(root))
    if proc.returncode != 0:
        raise RuntimeError(f"the shared 2-step run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return root


def _resumed(tmp: Path, damage=None, **extra):
    """Copy the finished run into ``tmp``, damage it, resume it; (process, run folder)."""
    run = tmp / "run"
    shutil.copytree(_finished() / "run", run)
    if damage:
        damage(run)
    args = _train_args(tmp, **{"data.cache_dir": str(_finished() / "ds_cache"), **extra}) + ["--resume"]
    return run_cli(args), run


def _last(proc) -> str:
    text = (proc.stderr + proc.stdout).strip()
    return text.splitlines()[-1] if text else "(nothing printed)"


def _records(run: Path, kind: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


# --- resume with changed settings (item 5) and a finished run (item 6) ---------------------


@case("training", "resume: raised max_steps and a new lr take effect")
def _resume_new_lr(tmp: Path):
    proc, run = _resumed(tmp, **{"train.max_steps": 4, "train.lr": 1e-3})
    if proc.returncode != 0:
        return False, _last(proc)
    lrs = [r["lr_base"] for r in _records(run)]
    ok = len(lrs) == 4 and abs(lrs[2] - 1e-3 * 0.5) < 1e-9 and lrs[2] > lrs[3] > 0 and "train.lr: 0.005 -> 0.001" in proc.stdout
    return ok, f"lr of steps 3, 4: {lrs[2:]}; " + next((l for l in proc.stdout.splitlines() if "changed" in l), "no change listed")


@case("training", "resume: a run killed after its last checkpoint finishes")
def _resume_finished(tmp: Path):
    def kill(run):
        shutil.rmtree(run / "final")
        (run / "summary.json").unlink()

    proc, run = _resumed(tmp, kill, **{"train.export": "true"})
    ok = proc.returncode == 0 and (run / "final").is_dir() and (run / "export").is_dir() and (run / "summary.json").is_file()
    return ok, f"exit {proc.returncode}; final/ {(run / 'final').is_dir()}, export/ {(run / 'export').is_dir()}, summary {(run / 'summary.json').is_file()}"


@case("training", "resume: lowered max_steps below the checkpoint")
def _resume_lower(tmp: Path):
    return clear_exit(_resumed(tmp, **{"train.max_steps": 1})[0])


# --- damaged or foreign training state (items 9, 18) -------------------------------------


for _name, _damage in {
    "micro_step 10**12": edit_trainer_state(micro_step=10**12),
    "micro_step below step": edit_trainer_state(micro_step=1),
    "string step": edit_trainer_state(step="2"),
    "negative step": edit_trainer_state(step=-1),
    "null world_size": edit_trainer_state(world_size=None),
    "optimizer state of other shapes": foreign_optimizer,
    "optimizer state of no groups": lambda run: torch.save({"state": {}, "param_groups": []}, run / CKPT / "optimizer.pt"),
}.items():
    case("training", f"resume: {_name}")(
        functools.partial(lambda tmp, damage: clear_exit(_resumed(tmp, damage, **{"train.max_steps": 3})[0]), damage=_damage)
    )


@case("training", "resume: RNG file missing warns")
def _resume_rng(tmp: Path):
    proc, _ = _resumed(tmp, lambda run: (run / CKPT / "rng_rank0.pt").unlink(), **{"train.max_steps": 3})
    line = next((l for l in proc.stdout.splitlines() if "rng_rank0.pt is missing" in l), None)
    return proc.returncode == 0 and line is not None, line or _last(proc)


# --- divergence (item 7) ---------------------------------------------------------------


@case("training", "train: lr=1e6 diverges")
def _diverge(tmp: Path):
    proc = run_cli(_train_args(tmp, **{"train.max_steps": 6, "train.save_every": 1, "train.lr": 1e6, "train.max_grad_norm": "null"}))
    ok, line = clear_exit(proc)
    lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    valid = all(json.loads(l, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))) for l in lines)
    return ok and valid and "diverged at step" in line and not (tmp / "run" / "final").exists(), line


@case("training", "train: lora_alpha=1e30 under bf16")
def _huge_alpha(tmp: Path):
    proc = run_cli(_train_args(tmp, **{"molora.lora_alpha": 1e30, "train.mixed_precision": "bf16", "train.save_every": 0}))
    ok, line = clear_exit(proc)
    return ok and "warning: molora.lora_alpha=1e+30" in proc.stdout, line


# --- sequences and base models (items 10, 20) --------------------------------------------

cli_error(
    "train: data.max_length above GPT-2's learned positions",
    lambda tmp: _train_args(tmp, **{"model.from_config": GPT2, "molora.target_modules": "[c_attn]", "data.max_length": 32}),
    area="training",
)


@case("training", "train: data.max_length above RoPE positions warns")
def _rope_long(tmp: Path):
    proc = run_cli(_train_args(tmp, **{"model.from_config.max_position_embeddings": 16, "data.max_length": 32, "train.max_steps": 1}))
    line = next((l for l in proc.stdout.splitlines() if "max_position_embeddings=16" in l), None)
    return proc.returncode == 0 and line is not None, line or _last(proc)


def _base(tmp: Path, damage) -> Path:
    tiny_llama().save_pretrained(tmp / "base")
    damage(tmp / "base")
    return tmp / "base"


def _pickle_only(base: Path) -> None:
    for path in base.glob("*.safetensors"):
        path.unlink()
    torch.save(tiny_llama().state_dict(), base / "pytorch_model.bin")


def _architectures(value):
    def damage(base: Path) -> None:
        config = json.loads((base / "config.json").read_text())
        config["architectures"] = value
        (base / "config.json").write_text(json.dumps(config))

    return damage


cli_error(
    "train: base folder with pickle weights only",
    lambda tmp: _train_args(tmp, **{"model.from_config": "null", "model.name_or_path": str(_base(tmp, _pickle_only)), "model.tokenizer": "byte"}),
    area="training",
)


def _adapter(tmp: Path, **cfg) -> Path:
    model = get_molora_model(tiny_llama(), MoLoRAConfig(**{"target_modules": ["q_proj"], "num_experts": 2, "r": 2, "router": "soft", **cfg}))
    with torch.no_grad():
        for layer in model.molora_layers().values():
            layer.lora_B.normal_()
    model.save_pretrained(tmp / "adapter")
    return tmp / "adapter"


for _name, _damage in {
    "architectures names a config class": _architectures(["LlamaConfig"]),
    "architectures names a function": _architectures(["os.system"]),
    "pickle weights only": _pickle_only,
    "corrupt safetensors": lambda b: (b / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{bad}"),
}.items():
    cli_error(
        f"export --base: {_name}",
        functools.partial(
            lambda tmp, damage: ["export", str(_adapter(tmp)), "--out", str(tmp / "out"), "--base", str(_base(tmp, damage)), "--no-progress"],
            damage=_damage,
        ),
        area="training",
    )


# --- hostile adapter files (items 8, 9, 19) -----------------------------------------------


def _edit_weights(folder: Path, edit) -> Path:
    path = folder / "molora_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})
    return folder


def _edit_meta(folder: Path, edit) -> Path:
    path = folder / "molora_config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return folder


_KEY = "model.layers.0.self_attn.q_proj"


def _nan(tmp: Path) -> Path:
    return _edit_weights(_adapter(tmp), lambda s: s[f"{_KEY}.lora_B"].__setitem__((0, 0, 0), float("nan")))


@case("training", "export: adapter with a NaN weight")
def _nan_export(tmp: Path):
    base = _base(tmp, lambda folder: None)
    ok, line = clear_exit(run_cli(["export", str(_nan(tmp)), "--out", str(tmp / "out"), "--base", str(base), "--no-progress"]))
    return ok and "NaN or inf weights in layer" in line and _KEY in line and not (tmp / "out").exists(), line


@case("training", "load: adapter with a NaN weight warns naming the layer")
def _nan_load(tmp: Path):
    folder = _nan(tmp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MoLoRAModel.from_pretrained(tiny_llama(), folder)
    said = [str(w.message) for w in caught if "NaN" in str(w.message)]
    return bool(said) and _KEY in said[0], said[0] if said else "no warning"


for _dtype in (torch.bool, torch.int32):
    api_error(
        f"load: adapter with {_dtype} tensors",
        functools.partial(
            lambda tmp, dtype: MoLoRAModel.from_pretrained(
                tiny_llama(), _edit_weights(_adapter(tmp), lambda s: s.__setitem__(f"{_KEY}.lora_A", s[f"{_KEY}.lora_A"].to(dtype)))
            ),
            dtype=_dtype,
        ),
        "non-float",
        area="training",
    )


def _hostile(field: str):
    def edit(meta):
        meta["config"][field] = 10**7
        for entry in meta["modules"].values():
            entry[field] = 10**7

    return edit


for _field in ("num_experts", "r"):
    api_error(
        f"load: hostile {_field}=10**7 (consistent metadata)",
        functools.partial(lambda tmp, field: MoLoRAModel.from_pretrained(tiny_llama(), _edit_meta(_adapter(tmp), _hostile(field))), field=_field),
        "as the config builds it",
        area="training",
    )

cli_error(
    "inspect: adapter config r='4'",
    lambda tmp: ["inspect", str(_edit_meta(_adapter(tmp), lambda m: m["config"].__setitem__("r", "4")))],
    area="training",
)


# --- rank="auto" on expert structures (items 14, 15) ------------------------------------


@case("training", "export rank=auto vllm: shared experts, report rank = written rank")
def _auto_shared(tmp: Path):
    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj"], num_experts=4, r=2, router="soft", num_shared_experts=1))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
        for layer in model.molora_layers().values():
            layer.lora_B_shared.mul_(1e-4)
    rep = model.export_merged_adapter(tmp / "v", weights="uniform", rank="auto", tolerance=1e-2, target="vllm")
    written = json.loads((tmp / "v" / "adapter_config.json").read_text())["r"]
    return rep["auto"]["rank"] == written == rep["max_lora_rank"], f"report rank {rep['auto']['rank']}, written r={written}, cat rank {rep['auto']['cat_rank']}"


@case("training", "export rank=auto vllm: exact rank above 512")
def _auto_512(tmp: Path):
    import molora.merge.rank as rank

    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2, router="soft"))
    layers = model.molora_layers()
    gates = {n: torch.full((2,), 0.5) for n in layers}
    spectra, cat = rank._spectra, rank.cat_rank
    rank._spectra = lambda layers, gates: {n: torch.linspace(1, 1e-3, 600, dtype=torch.float64) for n in layers}
    rank.cat_rank = lambda layer, gates: 1024  # 16 experts x r=64, as on a 4096-wide layer (its SVD is slow on CPU)
    try:
        _, _, auto = rank.choose_rank(layers, gates, tolerance=0.5, target="vllm")
        try:
            rank.choose_rank(layers, gates, tolerance=1e-6, target="vllm")
            return False, "tolerance 1e-6 accepted"
        except ValueError as err:
            return auto["rank"] <= 512 and "\n" not in str(err), f"tolerance 0.5: rank {auto['rank']}; 1e-6: {str(err)[:90]}"
    finally:
        rank._spectra, rank.cat_rank = spectra, cat
