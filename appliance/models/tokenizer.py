"""Tokenizer, chat template and end-of-sequence ids, all from transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.errors import InvalidRequestError, ModelLoadError


def load_tokenizer(path: str | Path) -> Any:
    """An AutoTokenizer from a model directory or a .gguf file (which embeds its tokenizer)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"tokenizer path {str(path)!r} does not exist")
    from transformers import AutoTokenizer

    try:
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises OSError/ValueError/... for a bad tokenizer
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {type(exc).__name__}: {exc}") from exc


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def eos_token_ids(tokenizer: Any, hf_config: Any = None, generation_config: Any = None) -> list[int]:
    """Every id that ends a sequence: generation_config's first (Llama 3 instruct lists several),
    then the model config's, then the tokenizer's. Order kept, duplicates dropped."""
    ids: list[int] = []
    for source in (generation_config, hf_config):
        ids += _as_ids(getattr(source, "eos_token_id", None))
    if tokenizer is not None:
        ids += _as_ids(getattr(tokenizer, "eos_token_id", None))
    return list(dict.fromkeys(ids))


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], *,
                        no_template_hint: str = "send a plain prompt instead",
                        tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of `messages` rendered by the model's chat template, ending with the assistant's
    turn opened (add_generation_prompt=True); `tools` (OpenAI function tools) go to templates that
    render them (server/tools.py decides). Raises InvalidRequestError (param "messages") when
    the model has no template (the message ends with `no_template_hint`) or the template rejects
    the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(f"this model has no chat template; {no_template_hint}", param="messages")
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, tools=tools or None)
    except Exception as exc:  # jinja errors for a malformed conversation (roles out of order, …)
        raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
    return [int(i) for i in encoded["input_ids"]]
