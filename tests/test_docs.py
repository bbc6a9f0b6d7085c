"""Every ```python block of README.md and configs/README.md runs as written, on a tiny model.

How the blocks run (keep new blocks within these rules; a block that is not meant to run must
not be fenced as ```python: use ```bash, ```yaml or ```text):

- The blocks of one file run in order in one namespace, as a reader pasting them into one
  Python session would; each file starts with a fresh namespace in a fresh temporary folder,
  which is the current directory. Relative paths a block writes (``adapter/``) land there.
- The block text is never rewritten. What a block loads from the user's own disk is there as
  a real file, built from config (no download), under the name the README uses:

  ``path/to/llama``       a tiny Llama causal LM (vocab 259) with molora's byte tokenizer
                          (``AutoModelForCausalLM/AutoTokenizer.from_pretrained`` load it)
  ``loras/qa``,           two PEFT LoRA adapters (r=8, q_proj and v_proj) trained one step on
  ``loras/code``          that base, for ``MoLoRAModel.from_lora_adapters``

  A new block that needs another file of the user's adds it to ``_fixtures`` here.
- A block whose first line is ``# requires: pkg[, pkg]`` (a comment, so it still copies as is)
  is skipped with the rest of its file when one of those packages is not installed.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

DOCS = ("README.md", "configs/README.md")
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_REQUIRES = re.compile(r"^#\s*requires:\s*(.+)$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(1-based line of the block's first code line, code) of every ```python fence in ``text``."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def _fixtures(root: Path) -> None:
    """The user's files the README names, built from config under ``root``."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_llama_config
    from transformers import AutoModelForCausalLM

    from molora.training.tokenizer import build_byte_tokenizer

    torch.manual_seed(0)
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # molora's byte tokenizer
    config = tiny_llama_config(vocab_size=259, max_position_embeddings=256, **special)
    base_dir = root / "path" / "to" / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    build_byte_tokenizer().save_pretrained(base_dir)
    ids = torch.randint(3, 259, (2, 8))
    for i, name in enumerate(("qa", "code")):
        torch.manual_seed(10 + i)
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base_dir),
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        )
        opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()  # B starts at zero: one step makes the adapter non-trivial
        peft_model.save_pretrained(root / "loras" / name)


def test_python_blocks_are_found():
    """The extraction itself: fences found with their line numbers; other languages left out."""
    text = "intro\n```python\nx = 1\n```\n\n```bash\nls\n```\n```python\ny = x + 1\nz = y\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = x + 1\nz = y\n")]
    assert python_blocks((REPO_ROOT / "README.md").read_text()), "README.md has no ```python block"


@pytest.mark.parametrize("doc", DOCS)
def test_doc_python_blocks_run(doc, tmp_path, monkeypatch):
    blocks = python_blocks((REPO_ROOT / doc).read_text())
    if not blocks:
        pytest.skip(f"{doc} has no ```python block")
    for _, code in blocks:
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        if m := _REQUIRES.match(first):
            for pkg in (p.strip() for p in m.group(1).split(",")):
                if importlib.util.find_spec(pkg) is None:
                    pytest.skip(f"{doc}: a block requires {pkg!r}, which is not installed")
    _fixtures(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for line, code in blocks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the blocks' own output is not under test here
            try:
                exec(compile(code, f"{doc}:{line}", "exec"), namespace)  # noqa: S102 - the docs are the test
            except Exception as e:
                raise AssertionError(f"the ```python block at {doc}:{line} fails: {type(e).__name__}: {e}") from e
