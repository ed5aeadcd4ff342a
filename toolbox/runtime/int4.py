"""4-bit weight-only Linears on the CPU, on torch's own int4 kernel (``_weight_int4pack_mm_for_cpu``).

Each weight row is cut into groups of ``GROUP`` inputs; a group keeps a bfloat16 scale and
zero and 4-bit codes q in 0..15, so that ``w ~ (q - 8) * scale + zero`` (asymmetric: the
group's minimum and maximum are exact up to rounding). That is 5 bits per weight with
groups of 32, about llama.cpp's q4_0 (4.5) and q4_1 (5). The kernel reads the packed codes
and dequantizes them in registers, so a decode step streams a quarter of the bfloat16
bytes; activations are bfloat16 (the kernel's fast path; float32 input takes a slow
reference path).

The output layer is int8 instead (torch's dynamic quantization, float32 logits): 4-bit
rounding costs the most accuracy there, and 16-bit logits would blur log-probabilities.
A Linear whose shape the kernel cannot take (input width not a multiple of the group,
output width not a multiple of 16) is int8 too. The input embedding is int8 with a scale
per row (`Int8Embedding`: it is looked up, not multiplied, so it costs memory, not
time); the layer norms and biases are bfloat16.

The packed layout is the kernel's own and depends on the CPU build (AVX512 or AVX2),
so the quantized-weight cache keys on the CPU capability (`toolbox.runtime.quant`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GROUP = 32


def eligible(in_features: int, out_features: int, group: int = GROUP) -> bool:
    """Whether the int4 kernel takes a Linear of this shape."""
    return in_features % group == 0 and out_features % 16 == 0


def quantize_weight(weight: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor]:
    """Packed codes ``uint8 [N, K/2]`` and scales/zeros ``bf16 [K/group, N, 2]`` of ``weight [N, K]``.

    The codes are rounded against the bfloat16 scale and zero that the kernel will read.
    """
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-10).bfloat16()
    zero = (lo + 8 * scale.float()).bfloat16()
    s, z = scale.float()[..., None], zero.float()[..., None]
    codes = torch.round((w - z) / s + 8).clamp_(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return packed, torch.stack([scale.t(), zero.t()], dim=-1).contiguous()


class Int4Linear(nn.Module):
    """A Linear with 4-bit group-quantized weights (inference only; bfloat16 in and out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int = GROUP):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_zeros", torch.empty(in_features // group, out_features, 2, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.bfloat16) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = GROUP) -> Int4Linear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, group)
        q.weight, q.scales_zeros = quantize_weight(linear.weight, group)
        if linear.bias is not None:
            q.bias = linear.bias.detach().bfloat16()
        return q

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).bfloat16(), self.weight, self.group, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}"


class Int8Linear(nn.Module):
    """torch's dynamically quantized int8 Linear for a bfloat16 model: float32 in, and out
    in float32 (``logits=True``, the output layer) or back in the input's dtype."""

    def __init__(self, linear: nn.Module, logits: bool):
        super().__init__()
        self.linear, self.logits = linear, logits
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x.float())
        return y if self.logits else y.to(x.dtype)


class Int8Embedding(nn.Module):
    """An embedding table in int8 with a float32 scale per row (symmetric), widened as looked up."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(num_embeddings, 1))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        q = cls(embedding.num_embeddings, embedding.embedding_dim)
        rows = embedding.weight.detach()
        for lo in range(0, rows.shape[0], 4096):  # in slices: no float32 copy of the whole table
            chunk = rows[lo:lo + 4096].float()
            scale = chunk.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
            q.weight[lo:lo + 4096] = torch.round(chunk / scale).to(torch.int8)
            q.scale[lo:lo + 4096] = scale
        return q

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight[ids].float() * self.scale[ids]


def _dynamic_int8(linear: nn.Linear) -> nn.Module:
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import default_dynamic_qconfig

    linear = linear.float()
    linear.qconfig = default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's int8 dynamic quantization is deprecated for torchao
        return DynamicInt8Linear.from_float(linear)


def _slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(parent, name) for parent in module.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear]


def quantize_cpu_int4(module, group: int = GROUP):
    """Swap every Linear of a `GPTNeoX` for an `Int4Linear` (the output layer and odd shapes
    for an `Int8Linear`), one at a time, and the input embedding for an `Int8Embedding`, in
    place; the rest becomes bfloat16."""
    for parent, name in _slots(module):
        linear = getattr(parent, name)
        head = parent is module and name == "embed_out"
        if head or not eligible(linear.in_features, linear.out_features, group):
            setattr(parent, name, Int8Linear(_dynamic_int8(linear), logits=head))
        else:
            setattr(parent, name, Int4Linear.from_linear(linear, group))
        del linear
    module.embed_in = Int8Embedding.from_embedding(module.embed_in)
    for name, child in module.named_children():
        if name != "embed_in":
            child.bfloat16()
    return module


def int4_skeleton(module, group: int = GROUP) -> None:
    """Give a meta-device `GPTNeoX` the empty layers of `quantize_cpu_int4` (weights come from a state dict)."""
    import torch.ao.nn.quantized.dynamic as nnqd

    for parent, name in _slots(module):
        linear = getattr(parent, name)
        head = parent is module and name == "embed_out"
        bias = linear.bias is not None
        if head or not eligible(linear.in_features, linear.out_features, group):
            q = nnqd.Linear(1, 1, bias_=bias, dtype=torch.qint8)  # sized by the state dict it loads
            q.in_features, q.out_features = linear.in_features, linear.out_features
            setattr(parent, name, Int8Linear(q, logits=head))
        else:
            with torch.device("cpu"):
                setattr(parent, name, Int4Linear(linear.in_features, linear.out_features, bias, group))
    with torch.device("cpu"):
        module.embed_in = Int8Embedding(module.config.vocab_size, module.config.hidden_size)
