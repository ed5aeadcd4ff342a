"""Continuation log-likelihoods split into tokens exactly as lm-evaluation-harness splits them.

lm-eval encodes the context and the whole text, and takes the whole's ids after as many
ids as the context has: when the last context token merges with the first continuation
character (「。」+「「」 is one piece in the series' vocabulary) that differs from a split at
a common prefix, by several nats on such items. `toolbox eval choice` and the harness
adapter both use this split, so their accuracies are lm-eval's. Whitespace that ends a
context moves to the continuation first, and an empty context is the start token, also as
lm-eval does.
"""

from __future__ import annotations

from toolbox.errors import ToolboxError


def split(encode, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one pair, as lm-eval's TemplateLM makes them."""
    if not context:
        cont = encode(continuation)
        return ([prefix_id], cont) if not cont or cont[0] != prefix_id else (cont[:1], cont[1:])
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    if not context:
        return [prefix_id], encode(continuation)
    head = encode(context)
    return head, encode(context + continuation)[len(head):]


def score(model, pairs: list[tuple[list[int], list[int]]], max_length: int, batch: int,
          wheres: list[str] | None = None) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether each of its tokens ranked first) per
    pair of ids, longest first in batches through the backend's `score_from` (the output layer
    runs for the continuation only). A sequence longer than max_length keeps its last max_length
    tokens; lm-eval's hf model keeps max_length + 1 (the last one is only predicted, never fed),
    which the backend cannot take, so such a sequence has one context token less here. `wheres`
    name the pairs in errors."""
    seqs, firsts = [], []
    for i, (context, continuation) in enumerate(pairs):
        where = wheres[i] if wheres else f"request {i}"
        if not continuation:
            raise ToolboxError(f"{where}: the choice adds no token of its own (it merges into the context's last "
                               "token); separate them with a delimiter or end the context at punctuation")
        whole = (context + continuation)[-max_length:]
        if len(whole) <= len(continuation):
            raise ToolboxError(f"{where}: the continuation alone fills the context of {max_length} tokens")
        seqs.append(whole)
        firsts.append(len(whole) - len(continuation))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list = [None] * len(seqs)
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        for i, s in zip(chunk, model.loaded.score_from([seqs[i] for i in chunk], [firsts[i] for i in chunk])):
            out[i] = (float(sum(s.logprobs)), all(r == 1 for r in s.ranks))
    return out


def start_token(model) -> int:
    """The token an empty context stands for: BOS, else EOS (lm-eval's hf model's prefix)."""
    ids = model.tokenizer.special_ids
    for name in ("bos", "eos"):
        if name in ids:
            return ids[name]
    raise ToolboxError(f"{model.name}: the tokenizer defines neither BOS nor EOS to start from")
