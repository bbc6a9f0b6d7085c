"""Named chat templates for ``data.chat_template``: the usual formats, written as Jinja for
tokenizers that ship none (base models, molora's byte tokenizer).

Assistant turns are found by rendering, not by markers (:func:`molora.training.data.chat.chat_labels`):
a template needs no ``{% generation %}`` block, only renderings of a conversation's prefixes
that are prefixes of its rendering, which these templates are. (A template that has such blocks
is masked by them.)
"""

from __future__ import annotations

__all__ = ["CHAT_TEMPLATES", "apply_chat_template_setting", "check_chat_template", "resolve_chat_template"]

# name -> Jinja template; ``bos_token`` / ``eos_token`` are the tokenizer's, as transformers passes them
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
        "+ m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else "
        "m['role']) + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
}


def _is_jinja(value: str) -> bool:
    return "{%" in value or "{{" in value


def check_chat_template(value: object) -> str | None:
    """What is wrong with a ``data.chat_template`` value (None: nothing).

    Allowed: a name of :data:`CHAT_TEMPLATES`, or a Jinja template string that compiles.
    """
    if not isinstance(value, str):
        return f"must be a template name or a Jinja string, got {value!r}"
    if value in CHAT_TEMPLATES:
        return None
    if not _is_jinja(value):
        return f"must be one of {sorted(CHAT_TEMPLATES)} or a Jinja template string, got {value!r}"
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(value)
    except jinja2.TemplateSyntaxError as e:
        return f"is not a valid Jinja template (line {e.lineno}: {e.message}): {value[:60]!r}"
    return None


def resolve_chat_template(value: str) -> str:
    """The Jinja text of a template name, or ``value`` itself when it is a template.

    Raises:
        ValueError: neither a known name nor a valid Jinja template.
    """
    problem = check_chat_template(value)
    if problem:
        raise ValueError(f"`chat_template` {problem}")
    return CHAT_TEMPLATES.get(value, value)


def apply_chat_template_setting(tokenizer, value: str | None) -> bool:
    """Give ``tokenizer`` the ``data.chat_template`` when it has no chat template of its own.

    Returns:
        Whether the tokenizer's template was set.
    """
    if value is None or getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = resolve_chat_template(value)
    return True
