"""CPU fast path: Linear weights prepacked once into oneDNN's blocked layout.

At batch 1 every decode step is a chain of matrix-vector products; oneDNN's linear on
a weight reordered ahead of time for that shape runs them about twice as fast as
`F.linear` on a plain weight (bench/generate_cpu.py). Falls back to plain `nn.Linear`
where torch was built without oneDNN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
