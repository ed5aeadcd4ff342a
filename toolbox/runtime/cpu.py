"""CPU fast paths: prepacked oneDNN Linears, and the decode step compiled by inductor.

Eager (the default): Linear weights prepacked once into oneDNN's blocked layout. At
batch 1 every decode step is a chain of matrix-vector products; oneDNN's linear on a
weight reordered ahead of time for that shape runs them about twice as fast as
`F.linear` on a plain weight (bench/generate_cpu.py). Falls back to plain `nn.Linear`
where torch was built without oneDNN.

Compiled (`CompiledDecode`): the decode step compiled by inductor, which fuses the ~100
small operations around the matrix products (1-2 ms of a shape-S step eagerly at one
thread, 0.3 ms of the embedded model's). The products themselves (docs/performance.md):

- float32 (up to 2 GiB of weights), and bfloat16 and small int8 models on CPUs with AMX:
  frozen into the step and run by inductor's own C++ GEMMs, which stream the weights at
  one row faster than oneDNN's prepacked kernels (float32 weights past the CPU's caches:
  whichever of the two measures faster here); and int4 (torch's int4 kernel):
  compiled ahead of time into libraries kept on disk (`toolbox.runtime.aot`), built once
  per machine and loaded in milliseconds;
- bfloat16 without AMX (oneDNN prepacked) and the other int8 models (fbgemm), whose
  packed weights export cannot take: the eager kernels, called as opaque operators (`opaque_linears`) from a graph
  that torch.compile builds in every process, with a C++ wrapper; no freezing, no
  autotuning, so inductor's on-disk caches make a later compile take seconds.

The KV cache goes into the compiled step as an input (not as module state) and every
size is dynamic: one graph serves every prompt length, cache size and attention span,
and a second one every batch of two rows or more (sizes 1 are specialised), so nothing
recompiles in the middle of a generation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from itertools import count

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .aot import AOTStep, example_inputs, gemms, holds_head, library_path, scheme, use_inductor_cache_dir
from .model import GPTNeoX


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight reordered for oneDNN (inference only), and optionally the
    exact GELU that follows it applied by oneDNN to the product's output (``gelu=True``)."""

    def __init__(self, linear: nn.Linear, gelu: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        #: oneDNN's post-op and its algorithm ("none": the exact, erf GELU)
        self.post, self.algorithm = ("gelu", "none") if gelu else ("none", "")

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.post, [], self.algorithm)


def pack_linears(module: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `module` by a `PackedLinear` (in place); returns `module`.

    An MLP's exact GELU moves into its first product (a oneDNN post-op, the same values):
    one pass and one allocation less over the MLP's widest tensor, a tenth of scoring the
    embedded model at one thread on an Intel Xeon (docs/performance.md)."""
    from .model import MLP

    if not packing_available():
        return module
    for mlp in module.modules():
        if isinstance(mlp, MLP) and mlp.act is F.gelu and type(mlp.dense_h_to_4h) is nn.Linear:
            mlp.dense_h_to_4h, mlp.act = PackedLinear(mlp.dense_h_to_4h, gelu=True), nn.Identity()
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
    return module


# --- eager kernels as opaque operators of a compiled graph ---------------------------

#: handle -> the kernel call of one Linear (its packed weight bound); dropped with the Linear
_KERNELS: dict[int, Callable[[Tensor], Tensor]] = {}
_handles = count()
# defined through a plain Library rather than `custom_op`, whose Python layers cost 2-5 µs a
# call: a third of the embedded model's int8 products
_LIB = torch.library.Library("toolbox", "FRAGMENT")  # a fragment: leaves the namespace open to others
_LIB.define("cpu_linear(Tensor x, int handle, int out_features, ScalarType dtype) -> Tensor")
_LIB.impl("cpu_linear", lambda x, handle, out_features, dtype: _KERNELS[handle](x), "CPU")


@torch.library.register_fake("toolbox::cpu_linear")
def _(x: Tensor, handle: int, out_features: int, dtype: torch.dtype) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features, dtype=dtype)


def _kernel(linear: nn.Module) -> tuple[Callable[[Tensor], Tensor], torch.dtype | None]:
    """The direct kernel call of ``linear`` (what its forward runs, without the module's Python),
    and its output dtype (None: the input's)."""
    if isinstance(linear, PackedLinear):
        op, weight, bias = torch.ops.mkldnn._linear_pointwise.default, linear.weight, linear.bias
        post, algorithm = linear.post, linear.algorithm
        return (lambda x: op(x, weight, bias, post, [], algorithm)), None
    op, packed = torch.ops.quantized.linear_dynamic.default, linear._packed_params._packed_params
    reduce_range = linear.version is not None and linear.version >= 4  # as the module's own forward
    return (lambda x: op(x, packed, reduce_range)), torch.float32


def opaque_linears(module: nn.Module) -> None:
    """Make the Linears that the compiler cannot trace into (oneDNN's prepacked weights, torch's
    dynamically quantized int8) call their kernel through ``toolbox::cpu_linear`` (in place; the
    module's state and eager behaviour are unchanged)."""
    import torch.ao.nn.quantized.dynamic as nnqd

    op = torch.ops.toolbox.cpu_linear.default
    for m in module.modules():
        if isinstance(m, (PackedLinear, nnqd.Linear)) and "forward" not in m.__dict__:
            handle = next(_handles)
            _KERNELS[handle], dtype = _kernel(m)
            weakref.finalize(m, _KERNELS.pop, handle, None)

            def forward(x, handle=handle, out=m.out_features, dtype=dtype):
                return op(x, handle, out, dtype or x.dtype)

            m.forward = forward


# --- the compiled decode step ---------------------------------------------------------


class _Step(nn.Module):
    """The decode step as a module of its own: what is compiled (freezing applies to the
    parameters of the module compiled, not to those a function reaches)."""

    def __init__(self, module: GPTNeoX):
        super().__init__()
        self.module = module

    def forward(self, ids, pos, cache_pos, mask, kv_len: int, cache):
        return self.module(ids, pos, cache_pos, mask, kv_len=kv_len, cache=cache)


def _input_guards(entries) -> list[bool]:
    """Which of dynamo's guards to check on each call: those on the step's inputs (shapes, dtypes,
    the cache list) and the global state, not the ~700 on the module's attributes and the code's
    globals, which stay fixed once compiled (the documented contract). 0.1 ms a call less:
    12-20 % of the embedded model's step."""
    return [not e.name.startswith(("self.", "dict(type(self", "G[")) for e in entries]


class CompiledDecode:
    """A decode function (`toolbox.runtime.generation.DecodeFn`, and the continuous batcher's
    with an explicit ``cache``) running `module`'s decode step compiled (see the module docstring).

    Compiles on the first call of each kind (one row; two or more); `warm` does it now.
    The module must not change afterwards (float32 weights are frozen into the graph).
    """

    def __init__(self, module: GPTNeoX, key: str | None = None):
        """``key``: the checkpoint's cache key (`toolbox.runtime.quant.cache_key`), under which a
        step compiled ahead of time is kept on disk (`toolbox.runtime.aot`); None builds it afresh."""
        self.module, self.key = module, key
        #: "float32", "bfloat16", "int8" or "int4": compiled ahead of time (`toolbox.runtime.aot.scheme`); None: torch.compile
        self.ahead = scheme(module)
        #: kind (1: one row, 2: more) -> its step: an ahead-of-time library or the compiled graph
        self._steps: dict[int, Callable] = {}
        #: kinds whose library `warm` made sure of on disk, loaded at their first step: whether it built them
        self._prepared: dict[int, bool] = {}
        #: ``greedy(ids, pos, cache_pos, key_mask, kv_len, forbid) -> (tokens, logprobs)``: the step with
        #: `toolbox.runtime.sampling.pick_greedy` inside it, where the library holds the output layer; else None
        self.greedy = self._pick if self.ahead and holds_head(module, self.ahead) else None
        if self.ahead:
            return
        import warnings

        import torch._inductor.config as inductor_config  # imports the compiler: about a second

        self._inductor_config = inductor_config
        use_inductor_cache_dir()
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # from inductor's autotuner
        opaque_linears(pack_linears(module))
        self._graph = torch.compile(_Step(module), dynamic=True, options={"guard_filter_fn": _input_guards})

    @property
    def built(self) -> bool:
        """Whether loading compiled anything (false when every step came from the disk cache)."""
        return any(self._prepared.values()) or any(getattr(step, "built", True) for step in self._steps.values())

    @property
    def kind(self) -> str:
        """What the products run on, for the one-line note (and a batch's, where they differ)."""
        step = self._steps.get(1)
        if not isinstance(step, AOTStep):
            return "the eager kernels"
        batch = self._steps.get(2)
        if isinstance(batch, AOTStep):
            batch = batch.gemms
        elif self.key and 2 in self._prepared:
            batch = gemms(library_path(self.key, 2), self.ahead)
        return step.gemms if batch in (None, step.gemms) else f"{step.gemms}; batches on {batch}"

    def __call__(self, ids: Tensor, pos: Tensor, cache_pos: Tensor, key_mask: Tensor | None, kv_len: int,
                 cache=None) -> Tensor:
        step, args = self._inputs(ids, pos, cache_pos, key_mask, kv_len, cache)
        return step(*args)

    def _pick(self, ids: Tensor, pos: Tensor, cache_pos: Tensor, key_mask: Tensor | None, kv_len: int,
              forbid: Tensor) -> tuple[Tensor, Tensor]:
        """`greedy`: the step's own greedy choice (`toolbox.runtime.aot.AOTStep.greedy`)."""
        step, args = self._inputs(ids, pos, cache_pos, key_mask, kv_len, None)
        return step.greedy(*args, forbid)

    def _inputs(self, ids, pos, cache_pos, key_mask, kv_len, cache):
        """The step for these inputs, and the inputs as it takes them."""
        m = self.module
        if cache is None:
            cache = m.cache
        B, S = ids.shape[0], cache[0][0].shape[2]
        # one input structure for both callers: per-row slots [B,1] and a key mask [B,S]
        if cache_pos.dim() == 1:
            cache_pos = cache_pos.view(1, -1) if B == 1 else cache_pos.view(1, -1).repeat(B, 1)
        elif cache_pos is pos:  # the continuous batcher's: aliased inputs would be a graph of their own
            cache_pos = pos.clone()
        if key_mask is None:
            key_mask = torch.ones(B, S, dtype=torch.bool, device=ids.device)
        step = self._steps.get(min(B, 2))
        if step is None:
            step = self._step(min(B, 2))
        return step, (ids, pos, cache_pos, key_mask, kv_len, cache)

    def _step(self, kind: int) -> Callable:
        if self.ahead:
            step = self._steps[kind] = AOTStep(self.module, kind, self.key, self.ahead)
            return step
        graph, config = self._graph, {"cpp_wrapper": True}

        def first(*args):
            # a C++ wrapper calls the kernels, not a Python one: 15-30 % of the embedded model's
            # int4 step, less on larger ones; applied only while this kind compiles (a config
            # patch on every call cost 20-40 µs). A later recompile (none is expected: every size
            # is dynamic) would run with a Python wrapper: slower, not wrong.
            with self._inductor_config.patch(config):
                out = graph(*args)
            self._steps[kind] = graph
            return out

        return first

    def warm(self, batch_sizes=(1,)) -> None:
        """Compile (or load) now the decode steps of each batch size (1, and any size >= 2); a
        library kept on disk for two rows or more is only built if missing (`toolbox.runtime.aot.prepare`)."""
        from .aot import prepare

        with torch.inference_mode():
            for B in sorted(set(min(b, 2) for b in batch_sizes)):
                if B > 1 and self.ahead and self.key and B not in self._steps:
                    self._prepared[B] = prepare(self.module, B, self.key, self.ahead)
                    continue
                ids, pos, cache_pos, key_mask, span, cache = example_inputs(self.module, B)
                self(ids, pos, cache_pos, key_mask, span.shape[0], cache)
