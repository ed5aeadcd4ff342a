"""Prompt formats of the series: plain text, and the instruction variants' chat template."""

from __future__ import annotations

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

    `turns` are (role, text) pairs with role "user" or "assistant"/"system" (the model's side).
    """
    speakers = {"user": USER, "assistant": SYSTEM, "system": SYSTEM}
    utterances = [f"{speakers[role]}: {to_model_text(text)}" for role, text in turns]
    return NL.join([*utterances, f"{SYSTEM}: "])
