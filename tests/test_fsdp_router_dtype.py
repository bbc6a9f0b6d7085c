"""FSDP2 under bf16 keeps the routers in float32 (DESIGN §5): inside the forward, every router's
parameters are float32 while the rest of the decoder layer is gathered in bf16. Two CPU
processes (gloo) under torchrun, a tiny model, one forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_fsdp2_bf16_routers_compute_in_float32(tmp_path):
    out = tmp_path / "dtypes.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(Path(__file__).with_name("fsdp_router_worker.py")), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    routers = {name: dtypes for name, dtypes in seen.items() if name.endswith(".router")}
    assert len(routers) == 4  # q_proj and v_proj of 2 layers
    assert all(dtypes == ["torch.float32"] for dtypes in routers.values()), routers
    assert seen["experts"] == ["torch.bfloat16"]  # the experts follow the layer's bf16 policy
