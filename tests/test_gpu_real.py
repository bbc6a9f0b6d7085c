"""CUDA checks at real sizes (step 2 of ``scripts/gpu_check.sh``; skipped without a CUDA device).

- the Triton kernels against eager at the layer benchmark's shapes (in = out = 4096, T = 4096,
  N = 8, r = 16, bf16), top-2, soft and task routing: outputs and every gradient;
- a bf16 Llama-shaped model (hidden 1024, built from config) trained with molora: its loss falls;
- QLoRA on CUDA (NF4 base, bf16 compute) when bitsandbytes is installed: its loss falls.

Nothing here imports ``datasets`` (the GPU machines do not have it).
"""

import math
import warnings

import pytest
import torch

from molora import MoLoRAConfig, get_molora_model
from molora.core.experts import EXPERT_IMPLS
from routers import SoftRouter, TaskRouter, TopKRouter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

D, T, N, R = 4096, 4096, 8, 16


def _router(kind: str):
    if kind == "soft":
        return SoftRouter(D, num_experts=N, init_std=0.02)
    if kind == "task":
        return TaskRouter(num_experts=N, num_tasks=4, top_k=None, init_std=0.5)
    return TopKRouter(D, num_experts=N, top_k=2, init_std=0.02)


def _run(impl, router, x, A, B, task_ids, grad_out, dtype):
    x = x.detach().to(dtype).requires_grad_(True)
    routing = router(x, task_ids)
    y = EXPERT_IMPLS[impl](x, A.to(dtype), B.to(dtype), routing.weights, routing.indices, 2.0)
    grads = torch.autograd.grad(y, [x, A, B, *router.parameters()], grad_out.to(y.dtype))
    return y.float(), [g.float() for g in grads]


@pytest.mark.parametrize("kind", ["top2", "soft", "task"])
def test_triton_matches_eager_at_real_shapes_bf16(kind):
    pytest.importorskip("triton")
    from molora.core.kernels import triton_kernels

    if triton_kernels.INTERPRETED:
        pytest.skip("triton kernels were built for the interpreter in this process")
    torch.manual_seed(0)
    device = torch.device("cuda")
    router = _router(kind).to(device)
    x = torch.randn(T, D, device=device)
    A = (torch.randn(N, R, D, device=device) / math.sqrt(D)).requires_grad_(True)
    B = (0.1 * torch.randn(N, D, R, device=device)).requires_grad_(True)
    task_ids = torch.randint(0, 4, (T,), device=device)
    grad_out = torch.randn(T, D, device=device)
    y_ref, g_ref = _run("eager", router, x, A, B, task_ids, grad_out, torch.float32)
    y, g = _run("triton", router, x, A, B, task_ids, grad_out, torch.bfloat16)
    torch.testing.assert_close(y, y_ref, rtol=0.05, atol=0.02 * float(y_ref.abs().max()))
    for name, a, b in zip(["x", "A", "B", "router"], g, g_ref):
        torch.testing.assert_close(
            a, b, rtol=0.05, atol=0.03 * float(b.abs().max()) + 1e-3, msg=lambda m, name=name: f"grad {name}: {m}"
        )


def _llama(hidden: int, layers: int, dtype, quantization=None, folder=None):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if quantization is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map="cuda")
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
        intermediate_size=hidden * 8 // 3 // 64 * 64, vocab_size=4096, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device="cuda", dtype=dtype)


def _train(model, steps: int, lr: float) -> list[float]:
    torch.manual_seed(1)
    ids = torch.randint(0, 4096, (4, 256), device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("router", ["topk", "soft"])
def test_bf16_llama_training_loss_falls(router):
    base = _llama(1024, 4, torch.bfloat16)
    cfg = MoLoRAConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        num_experts=8, r=16, router=router, top_k=2 if router == "topk" else None,
    )  # fmt: skip
    model = get_molora_model(base, cfg)
    losses = _train(model, steps=30, lr=3e-3)
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0] - 0.5, losses  # memorizing one batch: a clear fall


def test_qlora_on_cuda_loss_falls(tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers

    _llama(512, 2, torch.float32).save_pretrained(tmp_path)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    base = _llama(512, 2, torch.bfloat16, quantization, tmp_path)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    cfg = MoLoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], num_experts=4, r=8, router="topk", top_k=2)
    model = get_molora_model(base, cfg)
    losses = _train(model, steps=30, lr=3e-3)
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0] - 0.5, losses
