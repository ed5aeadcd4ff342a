"""Next-token selection that stays on the device (no host sync, graph-friendly).

Filters follow the Hugging Face semantics so results are comparable with
``transformers.generate``: repetition penalty first, then temperature, top-k, top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = off; ties with the k-th are kept).
    top_p: keep the smallest most-likely set whose probability reaches top_p (1.0 = off).
    repetition_penalty: >1 discourages tokens already in the prompt or the output
        (a positive logit is divided by it, a negative one multiplied), 1.0 = off.
    seed: seeds the sampling generator; None draws a fresh random seed.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, seen_mask: Tensor, penalty: float) -> Tensor:
    """Penalise the logits of tokens marked in ``seen_mask [B,V]``."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen_mask, penalised, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the k-th largest of its row to -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: drop a token once the tokens ranked above it already hold mass >= p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: Tensor, params: SamplingParams, seen_mask: Tensor | None = None) -> Tensor:
    """Apply penalty, temperature, top-k and top-p to fp32 ``logits [B,V]`` (not in place)."""
    if params.repetition_penalty != 1.0 and seen_mask is not None:
        logits = apply_repetition_penalty(logits, seen_mask, params.repetition_penalty)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    return logits


def sample(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen_mask: Tensor | None = None,
    banned: Tensor | None = None,
    outside: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick one token per row from ``logits [B,V]``; returns ``(tokens [B], logprobs [B])``.

    ``seen_mask [B,V]`` marks tokens for the repetition penalty; ``banned [K]`` holds token
    ids that must not be chosen (e.g. EOS before min_new_tokens); ``outside [V]`` (bool)
    marks ids that are never chosen (a vocabulary padded past the tokenizer's). A sampled
    row takes one uniform draw from ``generator`` (see `draw`).

    The reported logprob is ``log_softmax`` of the *raw* logits (before penalty,
    temperature and filtering) at the chosen token: the model's own belief. Rows whose
    scores are not finite (inf or NaN logits) still give a real token (`finite_scores`).
    """
    logits = logits.float()
    scores = process_logits(logits, params, seen_mask)
    if banned is not None:
        scores = scores.index_fill(-1, banned, float("-inf"))
    if outside is not None:
        scores = scores.masked_fill(outside, float("-inf"))
    if params.greedy:
        tokens = first_max(scores)
    else:
        weights = finite_scores(scores).exp_()
        tokens = draw(weights, torch.rand(weights.shape[0], 1, generator=generator, device=weights.device))
    return tokens, logprobs_of(logits, tokens)


def first_max(scores: Tensor) -> Tensor:
    """The greedy choice of each row of ``scores [B,V]``: NaN never wins, the first +inf does,
    a row of -inf gives 0 (the maximum needs no shift). max's first index is argmax's, in
    half argmax's time on the CPU."""
    inf = float("inf")
    return scores.nan_to_num(-inf, inf, -inf).max(dim=-1).indices


def pick_greedy(logits: Tensor, forbid: Tensor) -> tuple[Tensor, Tensor]:
    """`sample`'s greedy choice from fp32 ``logits [B,V]`` with the ids it must not choose
    given as ``forbid [V]`` (0, or -inf for a banned or outside id): few enough operations
    to run inside a compiled decode step (`toolbox.runtime.aot`), in place of `sample`'s."""
    tokens = first_max(logits + forbid)
    return tokens, logprobs_of(logits, tokens)


def logprobs_of(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log_softmax(logits [B,V])`` at ``tokens [B]``: the model's own belief in each choice."""
    return logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def forbidden(vocab: int, ids: Tensor | None, outside: Tensor | None, device=None) -> Tensor:
    """`pick_greedy`'s ``forbid [V]``: -inf at ``ids`` (a banned id: EOS before
    min_new_tokens) and where ``outside [V]`` is true, 0 elsewhere."""
    forbid = torch.zeros(vocab, device=device)
    if ids is not None:
        forbid[ids] = float("-inf")
    if outside is not None:
        forbid.masked_fill_(outside, float("-inf"))
    return forbid


def finite_scores(scores: Tensor) -> Tensor:
    """Scores every row of which can be sampled, shifted so that each row's maximum is 0 (argmax
    and softmax are unchanged): NaN counts as excluded (-inf); a row holding +inf keeps only its
    +inf entries (as equals); a row with nothing left falls back to a uniform choice over the
    vocabulary rather than NaN probabilities. No host sync.

    Subtracting the row's maximum does it in four whole-tensor operations (a step at 16 rows
    of 8,000 took 1.2 ms with the cases handled one by one, 0.04 ms so): a +inf maximum turns
    the row's +inf entries, and a -inf one every entry, into NaN, which then become 0.
    """
    inf = float("inf")
    scores = scores.nan_to_num(-inf, inf, -inf)
    return (scores - scores.amax(-1, keepdim=True)).nan_to_num(0.0, inf, -inf)


def any_finite(scores: Tensor) -> Tensor:
    """``[..., V] -> [...]``: whether each row holds a finite entry (no host sync; 5x faster
    than ``isfinite().any(-1)`` on the CPU)."""
    inf = float("inf")
    return scores.nan_to_num(-inf, -inf, -inf).amax(-1) > -inf


def draw(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Tokens ``[B]`` drawn in proportion to ``weights [B,V]`` (probabilities up to a factor
    per row, e.g. ``exp`` of `finite_scores`: a softmax's division would be one more pass) by
    inverting each row's CDF at ``uniforms [B,1]``.

    One random number per row, where an exponential race would need one per vocabulary
    entry (on a CPU that costs more than a small model's whole decode step). A token of
    weight 0 is never drawn; no host synchronisation, so it runs in a CUDA graph.
    """
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    # strictly below the total, so that some entry of the CDF always lies above the target
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    # the clamp keeps a row whose weights are not finite on a real token id
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(weights.shape[-1] - 1)
