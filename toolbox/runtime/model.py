"""GPT-NeoX in plain PyTorch with a static, preallocated KV cache.

One code path for the layer math serves prefill, decode and scoring. The forward
pass uses fixed shapes and no host synchronisation, so a backend can capture the
decode step as a CUDA graph (keep ``kv_len=None`` there).

Cache layout: one key and one value tensor per layer, ``[B, heads, S, head_dim]``.
Rows of a batch share cache *slots* (``cache_pos [T]``) but have their own *positions*
(``input_pos``, used for rotary embedding): a ragged batch is left-padded, and
``key_mask`` hides each row's pad slots, so a row's output does not depend on its
padding. Alternatively every row writes to its own slots (``cache_pos [B,T]``), as a
continuous batcher needs, whose rows are at different lengths.

The cache is the module's own (``setup_cache``) or one the caller passes to
``forward(cache=...)`` (``new_cache``): a caller may pass views of a larger cache
(e.g. ``k[lo:hi]`` to prefill some rows, ``k[:n]`` to decode the first ``n`` rows);
the writes land in the viewed tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolbox.config import NeoXConfig

from .weights import load_state_dict

_ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU, as HF's "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def rotary_tables(cfg: NeoXConfig, device=None) -> tuple[Tensor, Tensor]:
    """fp32 cos/sin tables ``[max_positions, rotary_dim]`` (frequencies repeated twice)."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    angles = torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device=device)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x [..., D]`` (GPT-NeoX half-split pairing)."""
    rd, d = cos.shape[-1], x.shape[-1]
    rot = x if rd == d else x[..., :rd]
    first, second = rot.chunk(2, dim=-1)
    # rot * cos + cat(-second, first) * sin, the second term added into each half in place:
    # two passes over the tensor instead of five (and fused: one rounding less)
    out = rot * cos
    low, high = out.chunk(2, dim=-1)
    sin_low, sin_high = sin.chunk(2, dim=-1)
    low.addcmul_(second, sin_low, value=-1)
    high.addcmul_(first, sin_high)
    return out if rd == d else torch.cat([out, x[..., rd:]], dim=-1)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, ``[B, heads, S, head_dim]``."""

    def __init__(self, batch_size, num_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, num_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B,H,T,D]`` into slots ``cache_pos`` (``[T]`` or ``[B,T]``); return the whole cache."""
        write_kv(self.k, cache_pos, k)
        write_kv(self.v, cache_pos, v)
        return self.k, self.v


def write_kv(buf: Tensor, cache_pos: Tensor, new: Tensor) -> None:
    """Write ``new [B,H,T,D]`` into ``buf [B,H,S,D]`` at slots ``cache_pos``.

    ``cache_pos [T]``: the same slots for every row; ``[B,T]``: each row its own slots.
    Both are single device kernels (no host sync).
    """
    if cache_pos.dim() == 1:
        buf.index_copy_(2, cache_pos, new)
    elif buf.shape[0] == 1:  # one row: the cheaper shared-slots kernel
        buf.index_copy_(2, cache_pos[0], new)
    else:
        rows = torch.arange(buf.shape[0], device=buf.device)[:, None]  # [B,1] with [B,T] -> [B,T,H,D]
        buf[rows, :, cache_pos] = new.transpose(1, 2)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention of one query per row (``q [B,H,1,D]``), for 16-bit types on the CPU, and
    for float32 too inside a compiled step.

    torch's fused CPU kernel is built for blocks of queries; at one query in bfloat16 it
    took 1.3x (80 keys) to 7x (2,048 keys) as long as these three operations
    (docs/performance.md). In a compiled step inductor fuses the three into one loop,
    where the fused kernel stays a call with its layout work around it: 5.5 against
    20.5 us a layer of the embedded float32 step. Products in the 16-bit type
    (accumulated in fp32), softmax in fp32. ``mask [B or 1,1,1,S]`` bool, None = every
    key. The scores are computed as ``k @ q^T``: ``k`` is usually a view of the first
    slots of a larger cache, and the product the other way round on such a view took
    4-8x as long.
    """
    w = (k @ q.transpose(-1, -2)).transpose(-1, -2).float() * q.shape[-1] ** -0.5
    if mask is not None:
        w = w.masked_fill(~mask, float("-inf"))
    return w.softmax(-1).to(v.dtype) @ v


def decode_span(kv_len: int, slots: int, device: torch.device, dtype: torch.dtype) -> int:
    """How many cache slots a one-token step attends over: ``kv_len``, rounded up to a
    multiple of 64 (within ``slots``) for 16-bit types on the CPU.

    There `decode_attention`'s products run on oneDNN, which builds (compiles) and caches
    a kernel for every new shape: a span growing by one slot a step cost 0.8 ms and
    1.1 MB per step (docs/performance.md). The extra slots lie past every row's position
    and the causal mask hides them.
    """
    if device.type != "cpu" or dtype == torch.float32:
        return kv_len
    return torch.sym_min(slots, -(-kv_len // 64) * 64)


class Attention(nn.Module):
    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, cache_pos, kv_len, kv, start=0):
        """``kv``: this layer's ``(keys, values)`` cache tensors, or None (no cache). ``start``
        (cache-free only): the outputs of positions ``start..`` only (keys of every position)."""
        B, T, C = x.shape
        # The fused projection is laid out per head as [q | k | v].
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        qk, v = qkv.split([2 * self.head_dim, self.head_dim], dim=-1)
        # queries and keys rotated in one pass: [B,H,T,2,D] against cos/sin [B,1,T,1,rd]
        q, k = apply_rotary(qk.unflatten(-1, (2, self.head_dim)), cos, sin).unbind(-2)
        if start:
            q, T = q[:, :, start:], T - start
            # causal from the end: query i (position start + i) sees keys 0 .. start + i
            mask = mask[..., start:, :] if mask is not None else torch.ones(
                T, T + start, dtype=torch.bool, device=x.device).tril(start)
        if kv is not None:
            write_kv(kv[0], cache_pos, k)
            write_kv(kv[1], cache_pos, v)
            k, v = kv
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        if T == 1 and q.device.type == "cpu" and (q.dtype != torch.float32 or torch.compiler.is_compiling()):
            y = decode_attention(q, k, v, mask)
        else:  # mask None: plain causal attention over these tokens (cache-free, unpadded)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.parallel = cfg.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache_pos, kv_len, kv, start=0):
        """``start``: the outputs of positions ``start..`` only (see `Attention.forward`)."""
        a = self.attention(self.input_layernorm(x), cos, sin, mask, cache_pos, kv_len, kv, start)
        x = x[:, start:]
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + a + self.mlp(self.post_attention_layernorm(x))
        h = x + a  # sequential: h = x + attn(ln1(x)); h + mlp(ln2(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class GPTNeoX(nn.Module):
    """GPT-NeoX causal LM. Parameter names follow the HF checkpoint minus ``gpt_neox.``."""

    def __init__(self, config: NeoXConfig):
        super().__init__()
        self.config = config
        # Built on the meta device (a skeleton that loading fills), the embedding's random
        # init and the rotary tables would import torch._dynamo (about 1 s and 66 MB): skipped.
        weight = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.embed_in.weight
        self._init_rotary(None if not weight.is_meta else "meta")
        self.cache_shape: tuple[int, int] | None = None  # (batch, slots) once setup_cache ran
        self.cache: list[tuple[Tensor, Tensor]] | None = None  # per layer (keys, values) of that cache

    def _init_rotary(self, device):
        """The rotary tables on ``device`` (``"meta"``: placeholders until the weights are loaded)."""
        if device == "meta":
            self.register_buffer("rope_cos", None, persistent=False)
            self.register_buffer("rope_sin", None, persistent=False)
            return
        cos, sin = rotary_tables(self.config, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> GPTNeoX:
        """Load config.json and the weights of a HF-layout directory onto ``device`` as ``dtype``."""
        config = NeoXConfig.from_dir(model_dir)
        device = torch.device(device)
        with torch.device("meta"):
            model = cls(config)
        expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
        state = load_state_dict(model_dir, expected, device, dtype, tied=config.tie_word_embeddings)
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.embed_out.weight = model.embed_in.weight
        model._init_rotary(device)
        return model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.embed_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (the input embedding may be stored narrower)."""
        return self.final_layer_norm.weight.dtype

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate (or reuse) a zeroed-once static KV cache of ``max_seq_len`` slots.

        An existing cache is kept when the batch size matches and it has at least as
        many slots, so its tensors keep their addresses (for captured graphs).
        """
        ctx = self.config.max_position_embeddings
        if max_seq_len > self.cache_slots(ctx):
            raise ValueError(f"cache of {max_seq_len} slots exceeds the model's context of {ctx}")
        if self.cache_shape and self.cache_shape[0] == batch_size and self.cache_shape[1] >= max_seq_len:
            return
        c = self.config
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, c.num_heads, max_seq_len, c.head_dim, self.dtype, self.device)
        self.cache_shape = (batch_size, max_seq_len)
        self.cache = [(layer.attention.kv_cache.k, layer.attention.kv_cache.v) for layer in self.layers]

    def cache_slots(self, tokens: int) -> int:
        """The slots to allocate for ``tokens`` tokens: on the CPU rounded up to a multiple of 64,
        plus 64 (past the context if need be; positions never go there): `decode_span` then
        always stops short of the cache's end, which a compiled step (`toolbox.runtime.cpu`)
        takes as given, rather than compile the other case too."""
        if self.device.type != "cpu":
            return tokens
        return -(-tokens // 64) * 64 + 64

    def new_cache(self, batch_size: int, max_seq_len: int) -> list[tuple[Tensor, Tensor]]:
        """A zeroed cache owned by the caller, for ``forward(cache=...)``: per layer
        ``(keys, values)``, each ``[batch_size, heads, max_seq_len, head_dim]``."""
        c = self.config
        shape = (batch_size, c.num_heads, max_seq_len, c.head_dim)

        def zeros():
            return torch.zeros(shape, dtype=self.dtype, device=self.device)

        return [(zeros(), zeros()) for _ in range(c.num_layers)]

    def drop_cache(self) -> None:
        """Free the KV cache."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_shape = self.cache = None

    def forward(
        self,
        input_ids: Tensor,
        input_pos: Tensor,
        cache_pos: Tensor,
        key_mask: Tensor | None,
        *,
        kv_len: int | None = None,
        last_only: bool = False,
        cache: Sequence[tuple[Tensor, Tensor]] | None = None,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """Run ``input_ids [B,T]`` through the model, writing keys/values into the cache.

        ``input_pos [B,T]``: each row's token positions (rotary). ``cache_pos [T]``: the
        cache slots these tokens go to, in increasing order, the same for every row; or
        ``[B,T]``: each row's own slots (increasing along T). ``key_mask [B,S]`` bool: the
        slots each row may attend to (False for its pad slots; None = all); causality is by
        slot order: a token sees the slots up to its own, of its own row.
        ``kv_len``: attend only over the first ``kv_len`` slots (a Python int; faster on
        CPU, but changes shapes step to step — leave None for CUDA-graph capture).
        ``last_only``: compute logits for the last position only (prefill).
        ``cache``: per layer ``(keys, values)`` ``[B,H,S,D]`` to use instead of the module's
        own cache (see ``new_cache``; views of a larger cache work).
        ``logits_at [B]``: compute logits only at each row's given index along T (the last
        real token of a right-padded prefill).
        Returns fp32 logits ``[B,T,V]`` (``[B,1,V]`` with ``last_only`` or ``logits_at``).
        Without a cache (neither ``setup_cache`` nor ``cache``) tokens attend only to each
        other: ``S == T`` and ``cache_pos`` must be ``arange(T)``.
        """
        return self._run(input_ids, input_pos, cache_pos, key_mask, kv_len, last_only,
                         self.cache if cache is None else cache, logits_at)

    def _run(self, input_ids, input_pos, cache_pos, key_mask, kv_len, last_only, cache, logits_at=None, head=True,
             start=0):
        use_cache = cache is not None
        if use_cache and kv_len is not None and input_ids.shape[1] == 1:
            kv_len = decode_span(kv_len, cache[0][0].shape[2], input_ids.device, self.dtype)
        if use_cache:
            slots = torch.arange(cache[0][0].shape[2] if kv_len is None else kv_len, device=input_ids.device)
            if key_mask is not None and kv_len is not None:
                key_mask = key_mask[:, :kv_len]
        else:
            slots = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = None  # plain causal (only without a cache: SDPA aligns is_causal top-left)
        if use_cache or key_mask is not None:
            at = cache_pos[..., None]  # [T,1] or [B,T,1]
            mask = slots <= at  # [T,S] or [B,T,S]: causal in slot order
            if key_mask is not None:
                # A query sees the earlier slots its row allows, and always its own slot,
                # so pad queries never see an empty row (which would make NaNs).
                mask = mask & (key_mask[:, None, :] | (slots == at))  # [B,T,S]
            mask = mask.unsqueeze(-3)  # [B or 1, 1, T, S]
        cos = self.rope_cos[input_pos].to(self.dtype)[:, None, :, None]  # [B,1,T,1,rd]
        sin = self.rope_sin[input_pos].to(self.dtype)[:, None, :, None]

        x = self.embed_in(input_ids).to(self.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache_pos, kv_len, cache[i] if use_cache else None, start if i == last else 0)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]
        x = self.final_layer_norm(x)
        return self.embed_out(x).float() if head else x

    def forward_full(self, input_ids: Tensor, attention_mask: Tensor | None = None, hidden: bool = False,
                     start: int = 0) -> Tensor:
        """Cache-free forward over whole sequences (for scoring): fp32 logits ``[B,T,V]``.

        ``hidden=True`` stops before the output layer: the final-normed hidden states
        ``[B,T,H]`` in the model's dtype (scoring applies the head to scored positions only).
        ``start``: the outputs of positions ``start..`` only, ``[B,T-start,...]``: the last
        layer runs its queries, its output projection and its MLP for those alone (the
        other positions are context whose last-layer outputs nothing reads).

        ``attention_mask [B,T]`` (1/True = real token) may pad on either side; positions
        count real tokens only. Without a mask, attention is plainly causal (SDPA's
        ``is_causal``, which allows the fastest kernels). The KV cache is left untouched.
        """
        B, T = input_ids.shape
        slots = torch.arange(T, device=input_ids.device)
        if attention_mask is None:
            pos = slots.expand(B, T)
        else:
            attention_mask = attention_mask.bool()
            pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if not 0 <= start < T:
            raise ValueError(f"start {start} is outside 0..{T - 1}")
        return self._run(input_ids, pos, slots, attention_mask, None, False, None, head=not hidden, start=start)
