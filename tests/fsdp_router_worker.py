"""One rank of tests/test_fsdp_router_dtype.py (run by torchrun, 2 CPU processes, gloo): shard a
tiny MoLoRA model as ``molora train`` does under bf16 and record, inside one forward, the dtype
of every router's and every expert's parameters. Rank 0 writes them to argv[1] as JSON."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tiny_models import random_batch, tiny_llama

from molora import MoLoRAConfig, get_molora_model
from molora.training.distributed import shard_model


def main(out: str) -> None:
    dist.init_process_group("gloo")
    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, r=2, top_k=2))
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=2, mixed_precision="bf16")
    seen: dict[str, list[str]] = {}

    def record(name):
        def hook(module, args):  # runs after FSDP2's own pre-forward: the parameters are gathered
            seen[name] = sorted({str(p.dtype) for p in module.parameters()})

        return hook

    layers = model.molora_layers()
    shard_model(model, accelerator)
    for name, layer in layers.items():
        layer.router.register_forward_pre_hook(record(f"{name}.router"))
    expert = next(iter(layers.values()))
    expert.register_forward_pre_hook(
        lambda module, args: seen.__setitem__("experts", sorted({str(module.lora_A.dtype), str(module.lora_B.dtype)}))
    )
    with torch.no_grad():
        model(**random_batch(batch=2, seq=5))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
