"""Chat prompt building: the one place token ids of a prompt are made (SPEC §5.1).

Rules: the model's own chat template is used; a system message is folded into the first user turn
when the template has no system role (Gemma 3, Mistral-Instruct); the BOS token appears exactly once.
"""

from __future__ import annotations

from mlxgate.errors import UserError


def _template_error(err: Exception) -> bool:
    text = str(err).lower()
    return "system" in text or "roles must alternate" in text or "role" in text


def _fold_system(messages: list[dict]) -> list[dict]:
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        return rest
    return [{"role": "user", "content": system}, *rest]


def _dedupe_bos(ids: list[int], bos_id: int | None) -> list[int]:
    if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        return ids[1:]
    return ids


def bos_id(tokenizer) -> int | None:
    tok = getattr(tokenizer, "bos_token_id", None)
    return int(tok) if tok is not None else None


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True, continue_final: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered by the model's chat template.

    ``continue_final`` leaves the last (assistant) message open, for prefilled answers.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("this model's tokenizer has no chat template; use --raw to measure plain text")
    kwargs = dict(add_generation_prompt=add_generation_prompt and not continue_final)
    if continue_final:
        kwargs["continue_final_message"] = True
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as err:  # jinja2 TemplateError raised by templates without a system role
        if messages and messages[0]["role"] == "system" and _template_error(err):
            text = tokenizer.apply_chat_template(_fold_system(messages), tokenize=False, **kwargs)
        else:
            raise UserError(f"the chat template failed on these messages: {err}") from None
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return _dedupe_bos(ids, bos_id(tokenizer))


def prompt_ids(tokenizer, user: str, system: str | None = None, raw: bool = False) -> list[int]:
    """Ids of one user prompt: chat-templated with the generation prompt, or raw text (+BOS if the
    tokenizer adds one)."""
    if raw:
        return _dedupe_bos(list(tokenizer.encode(user)), bos_id(tokenizer))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return chat_ids(tokenizer, messages)
