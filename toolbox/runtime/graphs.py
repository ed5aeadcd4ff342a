"""A decode step with no host work per token: static inputs replayed as a CUDA graph.

`GraphedDecoder` wraps a `GPTNeoX` whose KV cache is set up (``setup_cache``) and is a
``decode_fn`` for :class:`~.generation.Generation`::

    decode_fn(ids [B,1], pos [B,1], cache_pos [1], key_mask [B,S], kv_len) -> logits [B,1,V]

On CUDA each call copies its inputs into static device buffers and replays a graph
captured once per (batch size, attention span): one launch instead of a few hundred
kernel launches from Python per layer. Graphs are captured lazily, after a warm-up on
a side stream, into one shared memory pool, and dropped when the model's cache is
reallocated (its addresses are baked into them). Should a capture fail, the decoder
warns once and decodes without graphs (``capture_error`` says why).

Attention span: a graph has fixed shapes, so it cannot attend over exactly ``kv_len``
slots. It attends over the first ``span`` slots, ``kv_len`` rounded up to a multiple
of ``kv_bucket`` (256 by default; at most the whole cache), with the causal mask
hiding the slots past the current token. The cost of attention then follows the length
in use, not the length allocated, at the price of one graph per bucket reached.
``kv_bucket=None`` attends over the whole cache (one graph per batch size).

``compile=True`` first runs the step through ``torch.compile(fullgraph=True,
dynamic=False)`` (Inductor fuses the small element-wise kernels: about +40 % at batch
1 on an H200, for about 40 s of compilation per new shape). A compiled step is
recompiled for every new (batch, span) shape, so with ``compile`` the default span is
the whole cache. If compilation fails the decoder warns once and goes on uncompiled.

Without CUDA (or with ``capture=False``) the same class runs in *eager* mode: it calls
the model with exactly the inputs a graph would see (the static span and the mask), so
the CPU tests check the graph path's arithmetic; only the capture itself needs a GPU.

`FastRuntimeModel` is the `RuntimeModel` of the GPU backends (``cuda``, ``quant`` on
CUDA): it sizes the cache in whole buckets before each generation (so graphs survive
from one request to the next), decodes through a `GraphedDecoder` and reports device
memory in ``describe()``.
"""

from __future__ import annotations

import functools
import sys
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import GPTNeoX

#: kv_bucket's default: 256 slots, or the whole cache when the step is compiled
AUTO_BUCKET = object()

#: Cache slots are allocated in multiples of this (FastRuntimeModel), so that a cache
#: and its graphs are reused across requests of similar length.
SLOT_MULTIPLE = 256


@dataclass(frozen=True)
class DecoderOptions:
    """How a GPU backend decodes (the backend reads them from its options)."""

    graphs: bool = True
    compile: bool = False
    kv_bucket: int | None | object = AUTO_BUCKET  # AUTO_BUCKET: 256, or the whole cache with compile


@dataclass
class _Static:
    """Device buffers a graph reads its inputs from."""

    ids: Tensor
    pos: Tensor
    cache_pos: Tensor
    key_mask: Tensor


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    out: Tensor  # written by every replay


class GraphedDecoder:
    """A ``decode_fn`` that replays CUDA graphs of the model's decode step (see the module doc).

    ``capture``: None = capture on CUDA, eager elsewhere; False = always eager.
    ``compile``: torch.compile the step (``compile_backend``, default Inductor).
    ``kv_bucket``: attention span granularity (default 256; the whole cache with
    ``compile``); None = the whole cache.
    ``warmup``: calls on a side stream before a capture (default 2; compile needs them
    to compile and autotune).
    ``clone_output``: return a copy of the graph's output, so it survives the next replay
    (a ``[B,1,V]`` fp32 copy: microseconds).
    """

    def __init__(
        self,
        model: GPTNeoX,
        *,
        capture: bool | None = None,
        compile: bool = False,
        kv_bucket=AUTO_BUCKET,
        warmup: int = 2,
        compile_backend: str = "inductor",
        clone_output: bool = True,
    ):
        cuda = model.device.type == "cuda"
        if capture and not cuda:
            raise ValueError(f"CUDA graph capture needs a model on a CUDA device, not {model.device}")
        self.model = model
        self.capture = cuda if capture is None else bool(capture)
        self.kv_bucket = (None if compile else 256) if kv_bucket is AUTO_BUCKET else kv_bucket
        if self.kv_bucket is not None and self.kv_bucket < 1:
            raise ValueError(f"kv_bucket must be >= 1 or None, got {self.kv_bucket}")
        self.warmup = max(1, warmup)
        self.clone_output = clone_output
        self.compiled = False
        self.compile_error: str | None = None
        self.capture_error: str | None = None
        self._step = self._eager_step
        if compile:
            self._compile(compile_backend)
        self._cache_key = None  # weak references identifying the cache the graphs were made for
        self._static: dict[tuple, _Static] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self.captures = 0  # graphs captured so far (for tests and the benchmark)

    # --- the step ---------------------------------------------------------------

    def _eager_step(self, ids, pos, cache_pos, key_mask, cache, span):
        return self.model(ids, pos, cache_pos, key_mask, kv_len=span, cache=cache)

    def _compile(self, backend: str) -> None:
        import torch._dynamo

        # one compilation per (batch, span) shape; keep them all instead of falling back to eager
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        self._step = torch.compile(self._eager_step, fullgraph=True, dynamic=False, backend=backend)
        self.compiled = True

    def _run_step(self, *args):
        """Run the (compiled) step; on a compilation failure warn once and go on eagerly."""
        if not self.compiled:
            return self._step(*args)
        try:
            return self._step(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch.compile raises many kinds
            self.compile_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"toolbox: torch.compile of the decode step failed, decoding without it ({self.compile_error})",
                  file=sys.stderr)
            self.compiled = False
            self._step = self._eager_step
            return self._step(*args)

    # --- cache tracking ---------------------------------------------------------

    def _model_cache(self) -> list[tuple[Tensor, Tensor]]:
        """The model's own cache as per-layer (keys, values); drops graphs made for an older one."""
        m = self.model
        if m.cache_shape is None:
            raise RuntimeError("GraphedDecoder needs the model's KV cache: call model.setup_cache first")
        first, last = m.layers[0].attention.kv_cache, m.layers[-1].attention.kv_cache
        key = self._cache_key
        if key is None or any(ref() is not obj for ref, obj in zip(key, (first, first.k, last.k))):
            self.reset()
            self._cache_key = (weakref.ref(first), weakref.ref(first.k), weakref.ref(last.k))
        return m.cache

    def reset(self) -> None:
        """Forget every graph and static buffer (they are made again on demand)."""
        self._graphs.clear()
        self._static.clear()
        self._cache_key = None

    def span(self, kv_len: int | None, slots: int) -> int | None:
        """Slots a step attends over: ``kv_len`` rounded up to the bucket; None = the whole cache."""
        if self.kv_bucket is None or kv_len is None:
            return None
        span = -(-kv_len // self.kv_bucket) * self.kv_bucket
        return None if span >= slots else span

    # --- the decode_fn ----------------------------------------------------------

    def __call__(self, ids: Tensor, pos: Tensor, cache_pos: Tensor, key_mask: Tensor | None,
                 kv_len: int | None = None) -> Tensor:
        with torch.inference_mode():
            cache = self._model_cache()
            B, S = cache[0][0].shape[0], cache[0][0].shape[2]
            if ids.shape != (B, 1):
                raise ValueError(f"GraphedDecoder decodes one token for each of the cache's {B} rows, "
                                 f"got input_ids of shape {tuple(ids.shape)}")
            span = self.span(kv_len, S)
            if not self.capture:
                return self._run_step(ids, pos, cache_pos, key_mask, cache, span)
            skey = (B, tuple(cache_pos.shape))
            st = self._static.get(skey)
            if st is None:
                dev = self.model.device
                st = _Static(
                    torch.zeros(B, 1, dtype=torch.long, device=dev),
                    torch.zeros(B, 1, dtype=torch.long, device=dev),
                    torch.zeros(cache_pos.shape, dtype=torch.long, device=dev),
                    torch.ones(B, S, dtype=torch.bool, device=dev),
                )
                self._static[skey] = st
            st.ids.copy_(ids, non_blocking=True)
            st.pos.copy_(pos, non_blocking=True)
            st.cache_pos.copy_(cache_pos, non_blocking=True)
            if key_mask is None:
                st.key_mask.fill_(True)
            else:
                st.key_mask.copy_(key_mask, non_blocking=True)
            gkey = (skey, span)
            g = self._graphs.get(gkey)
            if g is None:
                try:
                    g = self._graphs[gkey] = self._capture(st, cache, span)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as exc:  # noqa: BLE001 - decode correctly, if slowly, rather than fail
                    self.capture_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    print(f"toolbox: CUDA graph capture failed, decoding without graphs ({self.capture_error})",
                          file=sys.stderr)
                    self.capture = False
                    self.reset()
                    return self._run_step(ids, pos, cache_pos, key_mask, cache, span)
            g.graph.replay()
            return g.out.clone() if self.clone_output else g.out

    def _capture(self, st: _Static, cache, span) -> _Graph:
        """Warm up on a side stream, then capture one step reading the static buffers.

        The warm-up runs write this step's keys and values into the cache: the same values
        the replay right after writes, since the static buffers already hold this step's
        inputs.
        """
        args = (st.ids, st.pos, st.cache_pos, st.key_mask, cache, span)
        _warm_up(lambda: self._run_step(*args), self.warmup, self.model.device)
        if self._pool is None:
            self._pool = _new_pool()
        graph = _new_graph()
        try:
            out = _record(graph, self._pool, lambda: self._step(*args))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001
            if not self.compiled:
                raise
            # a compiled step that cannot be captured: capture the plain step instead
            self.compile_error = f"capture: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"toolbox: capturing the compiled decode step failed, using the uncompiled one "
                  f"({self.compile_error})", file=sys.stderr)
            self.compiled = False
            self._step = self._eager_step
            return self._capture(st, cache, span)
        self.captures += 1
        return _Graph(graph, out)


# The CUDA calls of a capture, kept apart so that a CPU test can stand in for them.


def _warm_up(fn, n: int, device: torch.device) -> None:
    """Run ``fn`` n times on a side stream (allocations and lazy init happen outside the capture)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(n):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)


def _new_pool():
    return torch.cuda.graph_pool_handle()


def _new_graph():
    return torch.cuda.CUDAGraph()


def _record(graph, pool, fn) -> Tensor:
    """Capture ``fn`` into ``graph`` (nothing runs); returns its output tensor, rewritten by each replay."""
    with torch.cuda.graph(graph, pool=pool):
        return fn()


# --- the RuntimeModel of the GPU backends ----------------------------------------


def device_memory(device: torch.device) -> dict:
    """Device memory figures for ``describe()`` (bytes); empty off CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "device_name": torch.cuda.get_device_name(device),
        "device_memory_total": total,
        "device_memory_free": free,
        "memory_allocated": torch.cuda.memory_allocated(device),
        "memory_reserved": torch.cuda.memory_reserved(device),
        "memory_peak": torch.cuda.max_memory_allocated(device),
    }


@functools.cache
def _fast_runtime_model_class():
    from toolbox.runtime.loaded import RuntimeModel

    class FastRuntimeModel(RuntimeModel):
        """`RuntimeModel` decoding through a `GraphedDecoder` (None: the plain path)."""

        def __init__(self, module: GPTNeoX, tokenizer, info: dict, decoder: GraphedDecoder | None):
            super().__init__(module, tokenizer, info, decode_fn=decoder)
            self.decoder = decoder

        def generate_tokens(self, prompts, params):
            if self.decoder is not None:
                self._size_cache(prompts, params)
            return super().generate_tokens(prompts, params)

        def _size_cache(self, prompts, params) -> None:
            """Allocate the cache in whole multiples of SLOT_MULTIPLE (Generation then reuses it)."""
            if not prompts or any(len(p) == 0 for p in prompts) or params.n < 1 or params.max_new_tokens < 1:
                return  # Generation reports the error
            ctx = self.module.config.max_position_embeddings
            need = max(len(p) for p in prompts) + params.max_new_tokens
            if need > ctx:
                return
            self.module.setup_cache(len(prompts) * params.n, min(ctx, -(-need // SLOT_MULTIPLE) * SLOT_MULTIPLE))

        def describe(self) -> dict:
            info = super().describe()
            info.update(device_memory(self.module.device))
            if self.decoder is not None:
                info["cuda_graphs"] = self.decoder.capture
                info["compiled"] = self.decoder.compiled
                for name in ("compile_error", "capture_error"):
                    if getattr(self.decoder, name):
                        info[name] = getattr(self.decoder, name)
            return info

    return FastRuntimeModel


def fast_runtime_model(module: GPTNeoX, tokenizer, info: dict, options: DecoderOptions):
    """The LoadedModel of a GPU backend: graphs (and compile) as ``options`` say."""
    decoder = None
    if options.graphs or options.compile:
        decoder = GraphedDecoder(module, capture=options.graphs and module.device.type == "cuda",
                                 compile=options.compile, kv_bucket=options.kv_bucket)
    info = {**info, "graphs": decoder is not None and decoder.capture, "compile": options.compile}
    return _fast_runtime_model_class()(module, tokenizer, info, decoder)
