"""Continuous batching for the built-in runtime: requests join and leave the running batch.

`ContinuousBatcher` implements `toolbox.batching.Batcher`. It owns a KV cache (not the
module's ``setup_cache`` one, so a `Generation` on the same module does not disturb it)
of up to ``capacity`` rows, one request per row, every row at its own length.

Each `step()` does one of two things, then removes the rows that finished ('stop' on
an EOS id, 'length' after ``max_new_tokens``):

- *admit*: when requests are waiting and free rows exist, it moves them into free
  rows, in arrival order, and prefills their prompts (into slots ``0..L-1`` of their
  rows; right-padded together in groups of similar lengths, see `_admit`); the token
  sampled from a prefill is that request's first event. The step ends there, so first
  tokens go out without waiting for the running rows' decode;
- *decode*: otherwise, and always right after an admit step (so a stream of arrivals
  cannot stall the running rows), one decode step over every running row: one forward
  of ``[n, 1]`` tokens with per-row positions and cache slots (``cache_pos [n,1]``), so
  causality in slot order is each row's own mask (no ``key_mask``: a row only ever
  sees the slots it wrote itself).

Rows are kept compacted: the running requests occupy rows ``0..n-1`` and a decode step
works on the views ``k[:n]``, ``v[:n]`` (attention trimmed to the longest row with
``kv_len``), so a batch of few requests costs what its rows cost, not ``capacity``
rows. When a row leaves (finished or cancelled), the last row moves into its place:
a copy of the moving row's used slots, per layer.

The cache grows on demand (rows up to ``capacity``, slots up to ``max_seq_len``, at
least doubling; a growth copies the live rows) instead of being allocated whole up
front, so memory follows the load; it is kept, not shrunk, when the batch empties.
`reserve` allocates it whole at once.

Sampling settings are per request and applied to the whole batch at once: temperature,
top-k, top-p and the repetition penalty become ``[n, 1]`` tensors, greedy rows take
the argmax of the (penalised) logits, and EOS is banned per row until its
``min_new_tokens``. A seeded request draws its randomness from its own
``torch.Generator``, so its tokens do not depend on what else is in the batch (they
equal a static ``generate`` of it alone with that seed); unseeded requests share one
randomly seeded generator. The reported logprob is the log-softmax of the raw logits
at the chosen token, as in `generation.py`. The batch's scores are repaired for
non-finite values (`sampling.finite_scores`) only when a row's maximum is not finite.

GPU notes: the decode step has no host sync inside the forward, but its shapes change
with the number of rows ``n`` and with ``kv_len``, and the per-row inputs are built
from host lists each step (two syncs a step: whether every row's maximum is finite,
then the sampled tokens). To replay the decode step as a CUDA graph, `reserve` the
whole cache (stable addresses), capture one graph per bucket of row counts (1, 2, 4,
... ``capacity``) with ``kv_len=None``, pad ``n`` up to the bucket (padding rows write
only into their own, unused rows) and copy the per-row inputs into static tensors. The
batch-1 prefill is not a graph candidate (its length varies).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from toolbox.backend import TokenEvent
from toolbox.batching import SequenceRequest

from .model import GPTNeoX
from .sampling import SamplingParams, any_finite, apply_repetition_penalty, draw, finite_scores, first_max, top_p_filter


@dataclass(eq=False)
class _Row:
    """A running request (the i-th of `ContinuousBatcher._rows` lives in cache row i)."""

    request: SequenceRequest
    sampling: SamplingParams
    length: int  # tokens written into the cache
    produced: int = 0  # tokens emitted
    last: int = -1  # the last emitted token (the next decode input)
    generator: torch.Generator | None = None  # a seeded request's own generator
    done: bool = False
    error: Exception | None = None  # this request failed (see `ContinuousBatcher.take_refused`)


class ContinuousBatcher:
    """A continuous batcher over a `GPTNeoX` module; see the module docstring."""

    #: the most padded tokens prefilled in one forward (bounds the prefill's activations)
    PREFILL_TOKENS = 4096

    def __init__(self, module: GPTNeoX, eos_token_ids: Sequence[int], capacity: int, max_seq_len: int | None = None,
                 sampled_vocab: int | None = None, decode_fn=None):
        ctx = module.config.max_position_embeddings
        max_seq_len = ctx if max_seq_len is None else max_seq_len
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 1 <= max_seq_len <= ctx:
            raise ValueError(f"max_seq_len {max_seq_len} is outside 1..{ctx} (the model's context)")
        self.module, self.capacity, self.max_seq_len = module, capacity, max_seq_len
        # decode_fn(ids, pos, cache_pos, key_mask, kv_len, cache) -> logits, e.g. a compiled step
        self._decode_fn = decode_fn or (lambda ids, pos, cache_pos, key_mask, kv_len, cache: module(
            ids, pos, cache_pos, key_mask, kv_len=kv_len, cache=cache))
        self.vocab = module.config.vocab_size
        self.eos = frozenset(int(t) for t in eos_token_ids if 0 <= int(t) < self.vocab)
        dev = module.device
        self._eos_ids = torch.tensor(sorted(self.eos), dtype=torch.long, device=dev)
        # ids from here on (a vocabulary padded past the tokenizer's) are never sampled
        self._sampled_vocab = self.vocab if sampled_vocab is None else min(sampled_vocab, self.vocab)
        self._failed: list[tuple[int, Exception]] = []
        self._waiting: deque[SequenceRequest] = deque()
        self._rows: list[_Row] = []
        self._decode_owed = False  # the last step admitted: the next one decodes
        self._cache: list[tuple[Tensor, Tensor]] = []
        self._seen: Tensor | None = None  # [rows, V] bool: prompt and output tokens, for the repetition penalty
        self._alloc = (0, 0)  # (rows, slots) allocated
        self._shared_gen = torch.Generator(device=dev)
        self._shared_gen.seed()

    # -- the Batcher protocol ---------------------------------------------------------

    def add(self, request: SequenceRequest) -> None:
        """Queue a `SequenceRequest`; ValueError for one that cannot run (too long, bad settings)."""
        p, prompt = request.params, request.prompt
        if any(r.id == request.id for r in self._waiting) or any(r.request.id == request.id for r in self._rows):
            raise ValueError(f"request id {request.id} is already queued")
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if p.max_new_tokens < 1 or p.min_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 1 and min_new_tokens >= 0")
        if len(prompt) + p.max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {p.max_new_tokens} exceeds "
                f"the batcher's {self.max_seq_len} cache slots"
            )
        if not all(0 <= t < self.vocab for t in prompt):
            bad = next(t for t in prompt if not 0 <= t < self.vocab)
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.vocab}")
        _sampling(p)  # validates temperature, top_k, top_p, repetition_penalty
        self._waiting.append(request)

    def cancel(self, request_id: int) -> None:
        """Drop a waiting or running request; a running one frees its row at once."""
        self._waiting = deque(r for r in self._waiting if r.id != request_id)
        for i, row in enumerate(self._rows):
            if row.request.id == request_id:
                with torch.inference_mode():
                    self._remove([i])
                return

    def pending(self) -> int:
        return len(self._waiting) + len(self._rows)

    def running(self) -> int:
        return len(self._rows)

    def step(self) -> list[TokenEvent]:
        """Admit waiting requests (their first tokens), or advance the running ones by one token.

        A row whose work fails is isolated: the rows are retried in halves until the failing
        ones are found; those end (reported by `take_refused`), the others go on.
        """
        events: list[TokenEvent] = []
        with torch.inference_mode():
            groups = [] if self._decode_owed else self._admit()
            for lo, hi in groups:
                events += self._isolated(self._prefill, lo, hi)
            n = len(self._rows) if not groups else 0
            if n:
                events += self._isolated(self._decode, 0, n)
            done = [i for i, row in enumerate(self._rows) if row.done]
            if done:
                self._failed += [(self._rows[i].request.id, self._rows[i].error) for i in done
                                 if self._rows[i].error is not None]
                self._remove(done)
            # an admit step is followed by a decode step of every row, the new ones included
            self._decode_owed = bool(groups and self._rows)
        return events

    def take_refused(self) -> list[tuple[int, Exception]]:
        """(request id, error) of the requests that failed since the last call (their rows are gone)."""
        failed, self._failed = self._failed, []
        return failed

    def reserve(self, rows: int | None = None, slots: int | None = None) -> None:
        """Allocate the cache for ``rows`` rows of ``slots`` slots now (default: all of it)."""
        with torch.inference_mode():
            self._grow(rows or self.capacity, slots or self.max_seq_len)

    # -- internals ---------------------------------------------------------------------

    def _admit(self) -> list[tuple[int, int]]:
        """Move waiting requests (first come, first served) into free rows.

        Returns the row ranges to prefill together: the new rows are placed longest
        prompt first and grouped while right-padding wastes little (at most a quarter
        of the group's tokens, plus 32) and a group stays within ``PREFILL_TOKENS``.
        """
        take = min(len(self._waiting), self.capacity - len(self._rows))
        if take <= 0:
            return []
        requests = [self._waiting.popleft() for _ in range(take)]
        longest = max(len(r.prompt) + r.params.max_new_tokens for r in requests)
        self._grow(len(self._rows) + take, longest)
        groups: list[tuple[int, int]] = []
        real = 0  # prompt tokens in the last group
        for r in sorted(requests, key=lambda r: -len(r.prompt)):
            i, L = len(self._rows), len(r.prompt)
            self._rows.append(self._new_row(r))
            if groups:
                lo = groups[-1][0]
                padded = (i + 1 - lo) * len(self._rows[lo].request.prompt)  # the group's first is its longest
                if padded <= min(self.PREFILL_TOKENS, 1.25 * (real + L) + 32):
                    groups[-1], real = (lo, i + 1), real + L
                    continue
            groups.append((i, i + 1))
            real = L
        return groups

    def _new_row(self, request: SequenceRequest) -> _Row:
        sampling = _sampling(request.params)
        gen = None
        if sampling.seed is not None and not sampling.greedy:
            gen = torch.Generator(device=self.module.device)
            gen.manual_seed(sampling.seed)
        return _Row(request, sampling, length=0, generator=gen)

    def _grow(self, rows: int, slots: int) -> None:
        R, S = self._alloc
        if rows <= R and slots <= S:
            return
        if R == 0:  # first allocation: what is asked for, slots rounded up
            R2, S2 = rows, slots
        else:
            R2 = max(rows, min(self.capacity, 2 * R)) if rows > R else R
            S2 = max(slots, min(self.max_seq_len, 2 * S)) if slots > S else S
        S2 = self.module.cache_slots(min(self.max_seq_len, -(-S2 // 64) * 64))
        cache = self.module.new_cache(R2, S2)
        seen = torch.zeros(R2, self.vocab, dtype=torch.bool, device=self.module.device)
        n = len(self._rows)  # rows with cache contents (called before new rows join)
        if n:
            for (k, v), (k2, v2) in zip(self._cache, cache):
                k2[:n, :, :S].copy_(k[:n])
                v2[:n, :, :S].copy_(v[:n])
            seen[:n].copy_(self._seen[:n])
        self._cache, self._seen, self._alloc = cache, seen, (R2, S2)

    def _isolated(self, work, lo: int, hi: int) -> list[TokenEvent]:
        """`_pick(*work(lo, hi))` for rows lo..hi-1; on an error, the same in halves, down to
        single rows, and a row that fails alone is marked failed. `work` changes no state
        (writing a row's own cache slots again gives the same values), so retrying is safe."""
        try:
            return self._pick(*work(lo, hi), lo, hi)
        except Exception as exc:  # noqa: BLE001 - isolated to the rows that cause it
            if hi - lo == 1:
                row = self._rows[lo]
                row.done, row.error = True, RuntimeError(f"{type(exc).__name__}: {exc}")
                return []
            mid = (lo + hi) // 2
            return self._isolated(work, lo, mid) + self._isolated(work, mid, hi)

    def _prefill(self, lo: int, hi: int) -> tuple[Tensor, list[int]]:
        """Prefill the prompts of rows lo..hi-1 (right-padded) into slots 0.. of their rows.

        The pad tokens of a shorter prompt write keys and values past its end; causality
        hides them, and the row's decode steps overwrite them before it could see them.
        Returns each row's next-token logits ``[hi-lo, V]`` and the rows' lengths after it.
        """
        rows, dev = self._rows[lo:hi], self.module.device
        lengths = [len(r.request.prompt) for r in rows]
        T = max(lengths)
        # pad with the prompt's own last token, so that `seen` below marks prompt tokens only
        ids = torch.tensor([r.request.prompt + r.request.prompt[-1:] * (T - len(r.request.prompt)) for r in rows],
                           device=dev)
        pos = torch.arange(T, device=dev)
        at = torch.tensor(lengths, device=dev) - 1
        view = [(k[lo:hi], v[lo:hi]) for k, v in self._cache]
        logits = self.module(ids, pos.expand(hi - lo, T), pos, None, kv_len=T, cache=view, logits_at=at)[:, -1]
        seen = self._seen[lo:hi]
        seen.zero_()
        seen.scatter_(1, ids, True)
        return logits, lengths

    def _decode(self, lo: int, hi: int) -> tuple[Tensor, list[int]]:
        """One token for rows lo..hi-1 (each fed its last token at its own slot): logits [hi-lo,V]
        and the rows' lengths after it."""
        rows, dev = self._rows[lo:hi], self.module.device
        ids = torch.tensor([[r.last] for r in rows], device=dev)
        pos = torch.tensor([[r.length] for r in rows], device=dev)
        kv_len = max(r.length for r in rows) + 1
        view = [(k[lo:hi], v[lo:hi]) for k, v in self._cache]
        logits = self._decode_fn(ids, pos, pos, None, kv_len, view)[:, -1]
        return logits, [r.length + 1 for r in rows]

    def _pick(self, logits: Tensor, lengths: list[int], lo: int, hi: int) -> list[TokenEvent]:
        """Sample one token for each of rows lo..hi-1 from ``logits [hi-lo, V]``; emit events.

        A row whose logits hold nothing finite (NaN weights, an overflow) fails on its own.
        """
        rows = self._rows[lo:hi]
        tok, lp, logprobs, has_finite = self._sample(logits, rows, self._seen[lo:hi])
        k = max(r.request.params.top_logprobs for r in rows)
        parts = [tok.double(), lp.double(), has_finite.double()]
        if k:
            top_lp, top_id = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
            parts += [*top_id.T.double(), *top_lp.T.double()]
            k = top_id.shape[-1]
        host = torch.stack(parts).tolist()
        self._seen[torch.arange(lo, hi, device=tok.device), tok] = True
        events = []
        for j, (row, length) in enumerate(zip(rows, lengths)):
            if not host[2][j]:
                row.done, row.error = True, RuntimeError(
                    "the model produced no finite logits (its weights hold NaN or infinite values, or overflow "
                    "in this dtype)")
                continue
            t = int(host[0][j])
            row.length = length
            row.produced += 1
            row.last = t
            full = row.produced >= row.request.params.max_new_tokens
            reason = "stop" if t in self.eos else "length" if full else None
            row.done = reason is not None
            want = row.request.params.top_logprobs
            top = tuple((int(host[3 + i][j]), host[3 + k + i][j]) for i in range(min(want, k))) if want else None
            events.append(TokenEvent(row.request.id, t, host[1][j], reason, top))
        return events

    def _sample(self, logits: Tensor, rows: list[_Row], seen: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-row `sampling.sample`: tokens [n], their raw-logit logprobs [n], all of those [n, V]
        and whether each row's logits hold a finite value [n]."""
        dev, V = logits.device, logits.shape[-1]
        logits = logits.float()
        params = [r.sampling for r in rows]
        s = logits
        penalty = [p.repetition_penalty for p in params]
        if any(x != 1.0 for x in penalty):
            s = apply_repetition_penalty(s, seen, torch.tensor(penalty, device=dev)[:, None])
        greedy = [p.greedy for p in params]
        if not all(greedy):  # greedy rows take no temperature or filters
            temps = [1.0 if p.greedy else p.temperature for p in params]
            if any(t != 1.0 for t in temps):
                s = s / torch.tensor(temps, device=dev)[:, None]
            ks = [0 if p.greedy else min(p.top_k, V) for p in params]
            if any(ks):
                top = torch.topk(s, max(ks), dim=-1).values
                kth = top.gather(1, (torch.tensor(ks, device=dev).clamp_min(1) - 1)[:, None])
                kth = kth.masked_fill(torch.tensor(ks, device=dev)[:, None] == 0, float("-inf"))
                s = s.masked_fill(s < kth, float("-inf"))
            ps = [float("inf") if p.greedy or p.top_p >= 1.0 else p.top_p for p in params]
            if any(x != float("inf") for x in ps):
                s = top_p_filter(s, torch.tensor(ps, device=dev)[:, None])
        banned = [j for j, r in enumerate(rows) if r.produced < r.request.params.min_new_tokens] if self.eos else []
        if (banned or self._sampled_vocab < V) and s is logits:
            s = logits.clone()
        if banned:  # EOS before min_new_tokens: a few columns of a few rows, not a mask over [n, V]
            s[torch.tensor(banned, device=dev)[:, None], self._eos_ids] = float("-inf")
        if self._sampled_vocab < V:  # ids the tokenizer does not have
            s[:, self._sampled_vocab:] = float("-inf")
        top = s.amax(-1, keepdim=True)
        # nearly always every row holds a finite maximum, and then none of finite_scores' repairs
        # (NaN, +inf, nothing left) applies: one look on the host spares their four passes
        finite = bool(torch.isfinite(top).all())
        if all(greedy):
            tokens = first_max(s)
        else:
            weights = (s - top).exp_() if finite else finite_scores(s).exp_()
            uniforms = torch.zeros(len(rows), 1, device=dev)  # greedy rows: unused
            if any(not p.greedy and r.generator is None for p, r in zip(params, rows)):
                uniforms.uniform_(generator=self._shared_gen)
            for j, r in enumerate(rows):
                if r.generator is not None:
                    uniforms[j] = torch.rand(1, generator=r.generator, device=dev)
            tokens = draw(weights, uniforms)
            if any(greedy):
                tokens = torch.where(torch.tensor(greedy, device=dev), first_max(s), tokens)
        logprobs = logits.log_softmax(-1)
        # a finite score comes from a finite logit, so only a non-finite maximum needs the check
        has_finite = torch.ones(len(rows), dtype=torch.bool, device=dev) if finite else any_finite(logits)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1), logprobs, has_finite

    def _remove(self, indices: list[int]) -> None:
        """Free rows ``indices``, keeping the rest compacted (the last row moves into a hole)."""
        for i in sorted(indices, reverse=True):
            last = len(self._rows) - 1
            if i != last:
                moved = self._rows[last]
                L = moved.length
                if L:
                    for k, v in self._cache:
                        k[i, :, :L].copy_(k[last, :, :L])
                        v[i, :, :L].copy_(v[last, :, :L])
                    self._seen[i].copy_(self._seen[last])
                self._rows[i] = moved
            self._rows.pop()


def _sampling(p) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, repetition_penalty=p.repetition_penalty, seed=p.seed
    )
