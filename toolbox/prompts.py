"""Prompt formats of the series: plain text, and the instruction variants' chat template."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from toolbox.errors import ToolboxError

NL = "<NL>"
USER = "ユーザー"
SYSTEM = "システム"


def to_model_text(text: str) -> str:
    """Newlines as the instruction models expect them (`<NL>`)."""
    return text.replace("\n", NL)


def from_model_text(text: str) -> str:
    """`<NL>` back to newlines."""
    return text.replace(NL, "\n")


def chat_prompt(turns: list[tuple[str, str]]) -> str:
    """The instruction template: `speaker: text` utterances joined by <NL>, ending with the system's cue.

    `turns` are (role, text) pairs with role "user" (ユーザー) or "assistant" (システム, the
    model's side of the series' template).
    """
    speakers = {"user": USER, "assistant": SYSTEM}
    utterances = [f"{speakers[role]}: {to_model_text(text)}" for role, text in turns]
    return NL.join([*utterances, f"{SYSTEM}: "])


ROLES = ("system", "developer", "user", "assistant")


def message_turns(messages: Iterable) -> tuple[str | None, list[tuple[str, str]]]:
    """Chat messages -> (instructions, the template's user/assistant turns).

    Messages are mappings with "role" and "content" (a string, or a list of
    ``{"type": "text", "text": ...}`` parts) or (role, content) pairs. user and assistant
    messages are the template's ユーザー and システム turns; the series has no slot for
    instructions, so the text of system (and developer) messages is returned apart, to go
    in front of the first user message (`with_instructions`). The conversation must end
    with a user message. Errors name the message: ``messages[2].role: ...``.
    """
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    count = 0
    for i, message in enumerate(messages):
        count += 1
        if isinstance(message, Mapping):
            role, content = message.get("role"), message.get("content")
        elif isinstance(message, (tuple, list)) and len(message) == 2:
            role, content = message
        else:
            raise ToolboxError(f"messages[{i}]: expected a {{'role': ..., 'content': ...}} mapping or a (role, text) pair")
        if role not in ROLES:
            raise ToolboxError(f"messages[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}")
        text = _content_text(content, i)
        if role in ("system", "developer"):
            system.append(text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ToolboxError(f"messages[{max(count - 1, 0)}].role: the conversation must end with a user message")
    return ("\n".join(system) if system else None), turns


def with_instructions(instructions: str | None, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`turns` with the instructions in front of the first user message (a user turn of their own if none)."""
    if not instructions:
        return turns
    turns = list(turns)
    first = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
    if first is None:
        return [("user", instructions), *turns]
    turns[first] = ("user", f"{instructions}\n{turns[first][1]}")
    return turns


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ToolboxError(f"messages[{i}].content: must be a string or a list of {{'type': 'text', 'text': ...}} parts")


#: The instruction template as a Jinja chat template (transformers' and vLLM's convention), for
#: tools that render prompts themselves: the same text as `chat_prompt(with_instructions(...))`.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', seen_user=false) -%}"
    "{%- for m in messages if m['role'] in ['system', 'developer'] -%}"
    "{%- set ns.system = ns.system ~ ('\\n' if ns.system else '') ~ m['content'] -%}"
    "{%- endfor -%}"
    "{%- set turns = messages | selectattr('role', 'in', ['user', 'assistant']) | list -%}"
    "{%- if ns.system and not (turns | selectattr('role', 'equalto', 'user') | list) -%}"
    "{%- set turns = [{'role': 'user', 'content': ns.system}] + turns -%}{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- set text = m['content'] -%}"
    "{%- if m['role'] == 'user' and not ns.seen_user -%}"
    "{%- if ns.system -%}{%- set text = ns.system ~ '\\n' ~ text -%}{%- endif -%}"
    "{%- set ns.seen_user = true -%}"
    "{%- endif -%}"
    "{{ ('<NL>' if not loop.first else '') ~ ('ユーザー' if m['role'] == 'user' else 'システム') ~ ': '"
    " ~ text | replace('\\n', '<NL>') }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<NL>システム: ' }}{%- endif -%}"
)
