"""Token-level generation and scoring loops on top of :class:`~.model.GPTNeoX`.

Iterate a :class:`Generation` to get one :class:`Step` per
new token position. Sequences are the rows of the expanded batch, numbered
``prompt_index * n + sample_index``. To stop a sequence early (say, the text layer
found a stop string) call ``generation.cancel(seq)`` between steps: it emits nothing
more and the loop ends once every sequence has finished or been cancelled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from toolbox.errors import ToolboxError

from .model import GPTNeoX
from .sampling import SamplingParams, any_finite, forbidden, logprobs_of, sample


@dataclass(frozen=True)
class Token:
    """One new token of one sequence."""

    seq: int  # row of the expanded batch: prompt_index * n + sample_index
    token_id: int
    logprob: float  # log-softmax of the raw model logits at this token
    finish_reason: str | None  # 'stop' (an EOS id, included here), 'length', or None
    top: tuple[tuple[int, float], ...] | None = None  # with top_logprobs: the most likely (id, logprob)


@dataclass(frozen=True)
class Step:
    """The tokens produced at one position, for every sequence still running."""

    index: int  # 0 for the first new token
    tokens: list[Token]


#: ``decode_fn(input_ids [B,1], input_pos [B,1], cache_pos [1], key_mask [B,S], kv_len) -> logits [B,1,V]``.
#: A backend may substitute e.g. a CUDA-graph replay (which may ignore ``kv_len``). One that also has
#: ``greedy(same inputs, forbid [V]) -> (tokens [B], logprobs [B])`` (`sampling.pick_greedy` inside the
#: step, `toolbox.runtime.cpu.CompiledDecode`) serves greedy runs without top_logprobs or a penalty.
DecodeFn = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]


class Generation:
    """A batched generation from token-id prompts; iterate it (once) for :class:`Step` s.

    All prompts are prefilled in one left-padded forward, then one decode step runs per
    new token over a static cache of ``max prompt length + max_new_tokens`` slots.
    ``n`` samples per prompt expand the batch. EOS ids are banned until
    ``min_new_tokens`` tokens exist; a sequence ends with 'stop' on an EOS id (the EOS
    token is reported) or 'length' after ``max_new_tokens``. Ids from ``sampled_vocab`` on
    are never sampled (a vocabulary padded past the tokenizer's). Errors (context overflow,
    empty prompt) are raised here, before any work.
    """

    def __init__(
        self,
        model: GPTNeoX,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        sampling: SamplingParams = SamplingParams(),
        eos_token_ids: Sequence[int] = (),
        n: int = 1,
        decode_fn: DecodeFn | None = None,
        lookahead: bool | None = None,
        sampled_vocab: int | None = None,
        top_logprobs: int = 0,
    ):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1 or n < 1 or min_new_tokens < 0:
            raise ValueError("max_new_tokens and n must be >= 1, min_new_tokens >= 0")
        longest, ctx = max(len(p) for p in prompts), model.config.max_position_embeddings
        if longest + max_new_tokens > ctx:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's context of {ctx}"
            )
        vocab = model.config.vocab_size
        bad = [t for p in prompts for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {vocab}")
        self.model, self.n = model, n
        self.rows = [list(p) for p in prompts for _ in range(n)]
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.sampling, self.eos = sampling, set(eos_token_ids)
        self.decode_fn = decode_fn or (lambda ids, pos, slot, mask, kv_len: model(ids, pos, slot, mask, kv_len=kv_len))
        self.lookahead = model.device.type == "cuda" if lookahead is None else lookahead
        # ids from `sampled_vocab` on are never chosen (the tokenizer has fewer ids than the model's vocabulary)
        self.sampled_vocab = sampled_vocab if sampled_vocab is not None and sampled_vocab < vocab else None
        self.top = min(max(top_logprobs, 0), vocab)
        self._cancelled: set[int] = set()
        self._started = False

    @property
    def num_seqs(self) -> int:
        return len(self.rows)

    def prompt_index(self, seq: int) -> int:
        return seq // self.n

    def cancel(self, seq: int) -> None:
        """Stop sequence ``seq``: it produces no further tokens."""
        self._cancelled.add(seq)

    def __iter__(self) -> Iterator[Step]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        return self._steps()

    def _steps(self) -> Iterator[Step]:
        m, dev, rows = self.model, self.model.device, self.rows
        B, L = len(rows), max(len(r) for r in rows)
        params = self.sampling
        with torch.inference_mode():
            m.setup_cache(B, m.cache_slots(L + self.max_new_tokens))
            S = m.cache_shape[1]
            pad = torch.tensor([L - len(r) for r in rows], device=dev)
            ids = torch.tensor([[0] * (L - len(r)) + r for r in rows], device=dev)
            key_mask = torch.arange(S, device=dev)[None, :] >= pad[:, None]  # constant for the whole run
            input_pos = (torch.arange(L, device=dev)[None, :] - pad[:, None]).clamp_min(0)
            seen = None
            if params.repetition_penalty != 1.0:
                seen = torch.zeros(B, m.config.vocab_size, dtype=torch.bool, device=dev)
                r_idx = [i for i, r in enumerate(rows) for _ in r]
                seen[r_idx, [t for r in rows for t in r]] = True
            banned = torch.tensor(sorted(self.eos), dtype=torch.long, device=dev) if self.eos else None
            outside = None
            if self.sampled_vocab is not None:
                outside = torch.arange(m.config.vocab_size, device=dev) >= self.sampled_vocab
            gen = torch.Generator(device=dev)
            if params.seed is None:
                gen.seed()
            else:
                gen.manual_seed(params.seed)
            logits = m(ids, input_pos, torch.arange(L, device=dev), key_mask, kv_len=L, last_only=True)[:, -1]
            if not bool(any_finite(logits).all()):
                raise ToolboxError("the model produced no finite logits: its weights hold NaN or infinite values, "
                                   "or overflow in this dtype (try float32)")
            # every step's positions [B] and cache slot [1], made once rather than a tensor a step
            steps = torch.arange(self.max_new_tokens, device=dev)
            positions = (torch.tensor([len(r) for r in rows], device=dev)[None, :] + steps[:, None]).contiguous()
            slots = L + steps
            pinned = dev.type == "cuda"
            # a step that picks greedily itself (`CompiledDecode.greedy`), when nothing else shapes the choice
            fused = getattr(self.decode_fn, "greedy", None) if params.greedy and seen is None and not self.top else None
            if fused is not None:  # ids it must not pick: EOS before min_new_tokens, and after
                forbid = [forbidden(m.config.vocab_size, ban, outside, dev) for ban in (banned, None)]
            if pinned:  # two host buffers: step t+1's copy lands while step t's is read
                bufs = [torch.empty(2 + 2 * self.top, B, dtype=torch.float64, pin_memory=True) for _ in range(2)]

        def launch(step: int, logits: Tensor | tuple[Tensor, Tensor]):
            """Sample at ``step`` (unless ``logits`` is the step's own choice: tokens and logprobs)
            and start copying to the host, without waiting: rows of (tokens, logprobs, then with
            ``top`` the k best ids and the k logprobs), as lists on the CPU."""
            if isinstance(logits, tuple):
                tok, lp = logits
            else:
                tok, lp = sample(logits, params, gen, seen, banned if step < self.min_new_tokens else None, outside)
            top = logits.float().log_softmax(-1).topk(self.top, dim=-1) if self.top else None
            if not pinned:  # no copy to wait for: a list each, which costs less than stacking them
                rows = [tok.tolist(), lp.tolist()]
                return tok, (rows + top.indices.T.tolist() + top.values.T.tolist() if top else rows), None
            both = torch.stack([tok.double(), lp.double()])
            if top:
                both = torch.cat([both, top.indices.T.double(), top.values.T.double()])
            host = bufs[step % 2]
            host.copy_(both, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return tok, host, done

        def advance(step: int, tok: Tensor) -> Tensor | tuple[Tensor, Tensor]:
            """Feed the tokens sampled at ``step``: the logits for ``step + 1`` (or, from a step
            that picks greedily, its tokens and logprobs)."""
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            args = (tok[:, None], positions[step].view(B, 1), slots[step : step + 1], key_mask, L + step + 1)
            if fused is not None:
                return fused(*args, forbid[0] if step + 1 < self.min_new_tokens else forbid[1])
            return self.decode_fn(*args)[:, -1]

        running = [True] * B
        with torch.inference_mode():
            cur = launch(0, logits)
        for step in range(self.max_new_tokens):
            last = step == self.max_new_tokens - 1
            nxt = None
            if self.lookahead and not last:
                # queue step + 1 on the device before waiting for this step's tokens
                with torch.inference_mode():
                    nxt = launch(step + 1, advance(step, cur[0]))
            if cur[2] is not None:
                cur[2].synchronize()
            host = cur[1] if cur[2] is None else cur[1].tolist()
            host_tok, host_lp = host[0], host[1]
            k = self.top
            out = []
            for i in range(B):
                if not running[i] or i in self._cancelled:
                    running[i] = False
                    continue
                t = int(host_tok[i])
                reason = "stop" if t in self.eos else "length" if last else None
                running[i] = reason is None
                top = tuple((int(host[2 + j][i]), host[2 + k + j][i]) for j in range(k)) if k else None
                out.append(Token(i, t, host_lp[i], reason, top))
            if not out:
                return
            yield Step(step, out)
            running = [r and i not in self._cancelled for i, r in enumerate(running)]
            if not any(running):
                return
            if nxt is None:
                with torch.inference_mode():
                    nxt = launch(step + 1, advance(step, cur[0]))
            cur = nxt


@dataclass(frozen=True)
class SequenceScores:
    """The scores of one sequence's targets, as CPU tensors: entry k is target token ``first + k``.

    ``logprobs`` fp32: ``log p(token[t] | token[:t])`` from fp32 logits. ``ranks`` int64:
    ``1 + #(vocabulary entries with a strictly larger logit)``, so 1 is the most likely token.
    """

    logprobs: Tensor
    ranks: Tensor
    top_ids: Tensor | None = None  # [targets, k] int64: the k most likely tokens at each target (with `top`)
    top_logprobs: Tensor | None = None  # [targets, k] fp32: their log-probabilities


def score(
    model: GPTNeoX,
    token_ids: Sequence[Sequence[int]],
    max_batch_tokens: int = 4096,
    first: Sequence[int] | None = None,
    top: int = 0,
    kernel: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> list[SequenceScores]:
    """Per-token log-probabilities and ranks of whole sequences.

    Sequence ``i`` gets scores for its tokens ``first[i] .. len - 1`` (default ``first``
    1: every token that has a left context); the tokens before ``first[i]`` are context
    only, and the output layer is run for the scored positions alone. Sequences are
    sorted by length, right-padded and batched so that a batch holds at most
    ``max_batch_tokens`` padded positions (a longer single sequence goes alone); equal
    lengths share a batch with no mask, which lets attention use its fastest kernels.
    Ranks are computed on the device from the same fp32 logits as the log-probabilities.
    ``top``: also the ``top`` most likely tokens at each target and their log-probabilities.
    ``kernel``: what computes log-probabilities and ranks from a block of logits and its
    targets, in place of the eager operations (`toolbox.runtime.score_kernel`).
    """
    ctx = model.config.max_position_embeddings
    vocab = model.config.vocab_size
    seqs = [list(s) for s in token_ids]
    firsts = [1] * len(seqs) if first is None else [int(f) for f in first]
    if len(firsts) != len(seqs):
        raise ValueError(f"{len(firsts)} first indices for {len(seqs)} sequences")
    for s, f in zip(seqs, firsts):
        if len(s) > ctx:
            raise ValueError(f"sequence of {len(s)} tokens exceeds the model's context of {ctx}")
        if not 1 <= f <= max(len(s), 1):
            raise ValueError(f"first scored token {f} is outside 1..{len(s)}")
        if s and not (0 <= min(s) and max(s) < vocab):
            raise ValueError(f"token id outside the vocabulary of {vocab}")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # longest first
    batches, cur = [], []
    for i in order:
        # sorted: the batch's first sequence is its longest, so its padded length
        if cur and (len(cur) + 1) * len(seqs[cur[0]]) > max_batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    out: list[SequenceScores | None] = [None] * len(seqs)
    k = min(max(top, 0), vocab)
    empty = SequenceScores(torch.zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.int64),
                           torch.zeros(0, k, dtype=torch.int64) if k else None,
                           torch.zeros(0, k, dtype=torch.float32) if k else None)
    dev = model.device
    with torch.inference_mode():
        for chunk in batches:
            T = len(seqs[chunk[0]])
            counts = [max(len(seqs[i]) - firsts[i], 0) for i in chunk]
            if sum(counts) == 0:
                for i in chunk:
                    out[i] = empty
                continue
            ids = torch.tensor([seqs[i] + [0] * (T - len(seqs[i])) for i in chunk], device=dev)
            ragged = any(len(seqs[i]) != T for i in chunk)
            mask = None
            if ragged:
                mask = torch.tensor([[True] * len(seqs[i]) + [False] * (T - len(seqs[i])) for i in chunk], device=dev)
            lo = min(firsts[i] for i, n in zip(chunk, counts) if n) - 1  # first position whose output is needed
            hidden = _final_hidden(model, ids, mask, lo)  # [B, T-1-lo, H]: positions lo .. T-2
            rows = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor(counts))
            pos = torch.cat([torch.arange(firsts[i] - 1, firsts[i] - 1 + n) for i, n in zip(chunk, counts)])
            rows, pos = rows.to(dev), pos.to(dev)
            lp, rk, tid, tlp = _token_scores(model.embed_out, hidden[rows, pos - lo], ids[rows, pos + 1], vocab, k,
                                                kernel)
            lp, rk = lp.cpu(), rk.cpu()
            parts = zip(lp.split(counts), rk.split(counts),
                        tid.cpu().split(counts) if k else [None] * len(chunk),
                        tlp.cpu().split(counts) if k else [None] * len(chunk))
            for i, (piece_lp, piece_rk, piece_tid, piece_tlp) in zip(chunk, parts):
                out[i] = SequenceScores(piece_lp, piece_rk, piece_tid, piece_tlp)
    return out


def _final_hidden(model: GPTNeoX, ids: Tensor, mask: Tensor | None, lo: int) -> Tensor:
    """The output layer's input (final-normed hidden states) at positions ``lo .. T-2``;
    the last layer's outputs and the ``[B, T, V]`` logits of the context positions are never computed."""
    return model.forward_full(ids, mask, hidden=True, start=lo)[:, : ids.shape[1] - 1 - lo]


class TokenScores(nn.Module):
    """What scoring computes of each block of logits, eagerly or compiled (`score_kernel`):
    ``(logits [N,V] float32, targets [N] int64)`` -> the targets' log-probabilities ``[N]``
    float32 and ranks ``[N]`` int32 (1 + how many logits are larger)."""

    def forward(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        ranks = (logits > logits.gather(1, targets[:, None])).sum(-1, dtype=torch.int32) + 1
        return logprobs_of(logits, targets), ranks


def _token_scores(head, hidden: Tensor, targets: Tensor, vocab: int, top: int = 0, kernel=None):
    """fp32 log-probability and rank of ``targets [N]`` under ``head(hidden [N,H])``, and with ``top``
    the ``top`` most likely tokens ``[N, top]`` with their log-probabilities (else None, None);
    ``kernel`` as in `score`, else the same formula eagerly (`TokenScores`).

    The logits are made in row chunks: on the CPU 16 MiB of fp32 at a time, so that
    log-softmax and the rank count read them while they are still in cache (several
    times faster than over the whole ``[N,V]`` block, and few enough operations that
    threads rarely wait on each other); on CUDA up to 256 MiB (bounded memory, few launches).
    """
    n = hidden.shape[0]
    step = max(1, (1 << 26 if hidden.is_cuda else 1 << 22) // vocab)
    scores = kernel or TokenScores()
    lps, ranks, top_ids, top_lps = [], [], [], []
    for c in range(0, n, step):
        logits = head(hidden[c : c + step]).float()
        lp, rank = scores(logits, targets[c : c + step])
        lps.append(lp)
        ranks.append(rank)
        if top:
            values, indices = logits.log_softmax(-1).topk(top, dim=-1)
            top_ids.append(indices)
            top_lps.append(values)
    if not top:
        return torch.cat(lps), torch.cat(ranks).long(), None, None
    return torch.cat(lps), torch.cat(ranks).long(), torch.cat(top_ids), torch.cat(top_lps)
