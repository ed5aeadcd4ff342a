"""Fitting a prompt and its new tokens into the model's context: the one place for it.

A generation needs ``prompt tokens + max new tokens <= context``. The front ends differ
only in what they do when that fails, each a mode here:

- ``error``: say so, naming the setting to change (the default everywhere);
- ``left``: drop the prompt's oldest tokens (`toolbox generate --truncate left`);
- ``cap``: an *unrequested* maximum (a default) shrinks to the room left (the server's
  default max tokens), while a requested one that does not fit is still an error;
- dropping a conversation's oldest turns (`fit_turns`, for chat).
"""

from __future__ import annotations

from collections.abc import Callable

from toolbox.errors import ToolboxError

TRUNCATE_MODES = ("error", "left")


class ContextError(ToolboxError):
    """The prompt and its new tokens do not fit; `field` is what the user should change."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


LIBRARY_ADVICE = "pass truncate='left' or ask for fewer max_new_tokens"


def fit_prompt(ids: list[int], max_new_tokens: int, context: int, truncate: str = "error",
               where: str = "prompt", max_field: str = "max_new_tokens", advice: str = LIBRARY_ADVICE) -> list[int]:
    """`ids` when they fit with `max_new_tokens` new tokens; else an error (ending with `advice`, in
    the front end's own words), or (``left``) their newest part."""
    if truncate not in TRUNCATE_MODES:
        raise ValueError(f"truncate must be one of {TRUNCATE_MODES}, not {truncate!r}")
    if not ids:
        raise ContextError(f"{where}: empty prompt", where)
    if max_new_tokens >= context:
        raise ContextError(f"{max_field}: {max_new_tokens} new tokens leave no room for a prompt in the model's "
                           f"context of {context} tokens", max_field)
    room = context - max_new_tokens
    if len(ids) <= room:
        return ids
    if truncate == "left":
        return ids[-room:]
    raise ContextError(f"{where}: prompt of {len(ids)} tokens + {max_field} {max_new_tokens} exceeds the model's "
                       f"context of {context} ({advice})", where)


def cap_new_tokens(prompt_len: int, requested: int | None, default: int, context: int,
                   where: str = "prompt", max_field: str = "max_tokens") -> int:
    """New tokens for a prompt: the requested number (an error when it does not fit), else the
    default lowered to the room left. A prompt that fills the context leaves room only for 0."""
    if prompt_len > context or (prompt_len == context and requested != 0):
        raise ContextError(f"{where}: the prompt has {prompt_len} tokens; the model's context is {context} tokens "
                           "(prompt + new tokens)", where)
    room = context - prompt_len
    if requested is None:
        return min(default, room)
    if requested > room:
        raise ContextError(f"{max_field}: {requested} new tokens + a prompt of {prompt_len} tokens exceed the "
                           f"model's context of {context} tokens (at most {room} here)", max_field)
    return requested


def fit_turns(encode: Callable[[list[tuple[str, str]]], list[int]], turns: list[tuple[str, str]],
              room: int) -> tuple[list[int], int]:
    """Prompt ids for `turns`, dropping the oldest exchanges until they fit in `room` tokens.

    Returns the ids and how many turns were dropped. The last turn is never dropped; when
    it alone is too long, its newest `room` tokens are kept.
    """
    dropped = 0
    while True:
        ids = encode(turns[dropped:])
        if len(ids) <= room or dropped >= len(turns) - 1:
            return ids[-room:], dropped
        dropped += 2 if len(turns) - dropped > 2 else 1
