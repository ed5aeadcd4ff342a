"""CPU fast paths.

Eager (the default): Linear weights prepacked once into oneDNN's blocked layout. At
batch 1 every decode step is a chain of matrix-vector products; oneDNN's linear on a
weight reordered ahead of time for that shape runs them about twice as fast as
`F.linear` on a plain weight (bench/generate_cpu.py). Falls back to plain `nn.Linear`
where torch was built without oneDNN.

Compiled (`compiled_decode`, opt-in): the decode step compiled by inductor with the
weights frozen into the graph, its elementwise work fused, and each matrix product
autotuned between oneDNN and inductor's own C++ GEMM template. About 2.3x faster per
token on the embedded model, where oneDNN's per-call overhead dominates the small
matrix products; nothing measurable on models whose weights stream from memory. A
one-off cost of seconds per process (docs/generate.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .generation import DecodeFn
from .model import GPTNeoX


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight reordered for oneDNN (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linears(module: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `module` by a `PackedLinear` (in place); returns `module`."""
    if not packing_available():
        return module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
    return module


def compiled_decode(module: GPTNeoX) -> DecodeFn:
    """A `DecodeFn` running `module`'s decode step compiled (see the module docstring).

    Compiles on the first call (dynamic shapes: one graph serves every attention span;
    a batch of more than one row compiles once more); inductor's on-disk caches make
    later processes faster. The module must not change afterwards (frozen weights).
    """
    import warnings

    import torch._inductor.config as inductor_config

    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # from inductor's autotuner
    step = torch.compile(lambda ids, pos, slot, mask, kv_len: module(ids, pos, slot, mask, kv_len=kv_len),
                         mode="max-autotune-no-cudagraphs", dynamic=True)

    # frozen weights become constants: packed, and eligible for the GEMM template; autotuning stays quiet
    @inductor_config.patch(freezing=True, max_autotune_report_choices_stats=False, autotune_num_choices_displayed=0)
    def decode(ids: Tensor, pos: Tensor, slot: Tensor, mask: Tensor, kv_len: int) -> Tensor:
        return step(ids, pos, slot, mask, kv_len)

    return decode
