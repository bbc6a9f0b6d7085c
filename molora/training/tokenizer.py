"""Tokenizers for a training run: molora's file-free byte tokenizer, or the one named by
``model.tokenizer`` / ``model.name_or_path``, padded on the right."""

from __future__ import annotations

from molora.training.data.templates import apply_chat_template_setting
from molora.training.run_config import RunConfig

__all__ = ["build_byte_tokenizer", "load_tokenizer"]


def build_byte_tokenizer():
    """A byte-level tokenizer that needs no files: ids 0 <pad>, 1 <s> (prepended), 2 </s>,
    3 + b for byte b (vocab 259). For tiny models built from config.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # GPT-2's reversible byte -> printable unicode map, so that BPE sees one symbol per byte.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {chars[b]: 3 + b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def load_tokenizer(config: RunConfig):
    """The run's tokenizer, with a pad token (the eos token if it has none) and right padding.

    Args:
        config: the run config; ``model.tokenizer`` (default ``model.name_or_path``) names
            a tokenizer folder, or ``"byte"`` for :func:`build_byte_tokenizer`.

    Returns:
        A ``transformers`` tokenizer.

    Raises:
        ValueError: the tokenizer has neither a pad nor an eos token.
        FileNotFoundError: ``model.name_or_path`` has no tokenizer and ``model.tokenizer`` is not set.
    """
    source = config.model.tokenizer or config.model.name_or_path
    if source == "byte":
        tokenizer = build_byte_tokenizer()
    else:
        tokenizer = _auto_tokenizer(source, config)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {source!r} has neither a pad nor an eos token; give model.tokenizer one that does"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    apply_chat_template_setting(tokenizer, config.data.chat_template)  # only when it has none
    return tokenizer


def _auto_tokenizer(source: str, config: RunConfig):
    """``AutoTokenizer.from_pretrained(source)``, or a message naming ``model.tokenizer`` when the
    model folder has no tokenizer (rather than transformers' traceback)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        if config.model.tokenizer is not None:
            raise FileNotFoundError(f"model.tokenizer={source!r}: cannot load a tokenizer from it ({e})") from e
        raise FileNotFoundError(
            f"model.name_or_path={source!r} holds no tokenizer that transformers can load ({type(e).__name__}); "
            "pass model.tokenizer=<tokenizer folder or hub name> (or model.tokenizer=byte for molora's byte "
            "tokenizer with a model of vocab >= 259)"
        ) from e
