"""The int8 matrix-vector kernels torch offers on this CPU, at one row, on shape S's products.

Decode at batch 1 reads every weight once a token, so the kernel that streams int8
weights fastest decides the `quant` int8 speed. This times the 33 products of a decode
step of shape S (8 layers of hidden 1024, intermediate 4096, and the 32,000-row output
layer), each with weights of its own so that they come from memory as in a real step,
through each candidate:

  fbgemm        torch's dynamic quantization (`quant`'s kernel): activations quantized per call
  onednn        oneDNN's u8s8 `qlinear_pointwise` (the x86 inductor quantizer's kernel), the
                activation quantized per call (dynamic, per tensor) and already quantized
  int_mm        `torch._int_mm` (s8 x s8 -> s32), the activation quantized per call, then scaled
  woq-bf16      `_weight_int8pack_mm`: int8 weights, bfloat16 activations (weight-only)
  bf16          oneDNN's prepacked bfloat16 linear (twice the bytes)
  fp32          `F.linear` in float32 (four times the bytes): the reference every output is
                checked against (relative error of the first product)

    python bench/int8_kernels.py [--threads 2] [--runs 5] [--output bench/results/int8_kernels.json]

Prints ms per token (best of --runs passes over the 33 products) and the weight bytes
streamed per second, and writes them with the machine to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch

HIDDEN, INTER, LAYERS, VOCAB = 1024, 4096, 8, 32000
SHAPES = [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, INTER), (INTER, HIDDEN)] * LAYERS + [(HIDDEN, VOCAB)]


def candidates():
    """name -> list of one-row callables, one per product (weights built once)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import default_dynamic_qconfig

    g = torch.Generator().manual_seed(0)
    found = {name: [] for name in ("fp32", "fbgemm", "onednn dynamic", "onednn pre-quantized", "int_mm", "woq-bf16",
                                   "bf16")}
    for k, n in SHAPES:
        linear = torch.nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.normal_(0, 0.02, generator=g)
        x = torch.randn(1, k, generator=g)
        found["fp32"].append(lambda x=x, w=linear.weight.detach(), b=linear.bias.detach(): torch.nn.functional.linear(x, w, b))
        linear.qconfig = default_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dq = DynamicInt8Linear.from_float(linear)
        found["fbgemm"].append(lambda dq=dq, x=x: dq(x))

        w = linear.weight.detach()
        w_scale = (w.abs().amax(1) / 127).clamp_min(1e-8)
        w_int8 = torch.round(w / w_scale[:, None]).to(torch.int8)
        zeros = torch.zeros(n, dtype=torch.int64)
        packed = torch.ops.onednn.qlinear_prepack(w_int8, [1, k])
        bias = linear.bias.detach()

        def onednn(x=x, packed=packed, w_scale=w_scale, bias=bias, zeros=zeros):
            qx = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
            return torch.ops.onednn.qlinear_pointwise(qx.int_repr(), qx.q_scale(), qx.q_zero_point(), packed, w_scale,
                                                      zeros, bias, 1.0, 0, torch.float32, "none", [], "")

        qx = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
        qx_int, qx_scale, qx_zp = qx.int_repr(), qx.q_scale(), qx.q_zero_point()
        found["onednn dynamic"].append(onednn)
        found["onednn pre-quantized"].append(
            lambda packed=packed, w_scale=w_scale, bias=bias, qx_int=qx_int, s=qx_scale, z=qx_zp, zeros=zeros:
            torch.ops.onednn.qlinear_pointwise(qx_int, s, z, packed, w_scale, zeros, bias, 1.0, 0, torch.float32,
                                               "none", [], ""))

        w_t = w_int8.t()  # _int_mm takes [K, N]: a view of the row-major [N, K], as a GEMM reads x @ W.T

        def int_mm(x=x, w_t=w_t, w_scale=w_scale, bias=bias):
            s = x.abs().amax().clamp_min(1e-8) / 127
            xq = torch.round(x / s).to(torch.int8)
            return torch._int_mm(xq, w_t).float() * (w_scale * s) + bias

        found["int_mm"].append(int_mm)
        xb, wsb = x.bfloat16(), w_scale.bfloat16()
        found["woq-bf16"].append(lambda xb=xb, w=w_int8, s=wsb: torch.ops.aten._weight_int8pack_mm(xb, w, s))
        packed_bf16 = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 1)
        bias_bf16 = bias.bfloat16()
        found["bf16"].append(lambda xb=xb, p=packed_bf16, b=bias_bf16:
                             torch.ops.mkldnn._linear_pointwise(xb, p, b, "none", [], ""))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "int8_kernels.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = sum(k * n for k, n in SHAPES)
    results = {}
    with torch.inference_mode():
        found = candidates()
        reference = found["fp32"][0]()
        for name, calls in found.items():
            error = ((calls[0]().float() - reference).norm() / reference.norm()).item()
            for call in calls:  # warm: first calls build kernels
                call()
            best = min(_timed(calls) for _ in range(args.runs))
            per_byte = {"bf16": 2, "fp32": 4}.get(name, 1)
            results[name] = {"ms_per_token": round(best * 1e3, 3), "relative_error": round(error, 5),
                             "weight_gb_per_s": round(weights * per_byte / best / 1e9, 1)}
            print(f"{name:22s} {best * 1e3:7.2f} ms a token   {weights * per_byte / best / 1e9:5.1f} GB/s   "
                  f"error {error:.4f}", flush=True)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu, "threads": args.threads,
              "load_average": os.getloadavg(), "torch": torch.__version__, "weights": weights, "results": results}
    Path(args.output).write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"wrote {args.output}")


def _timed(calls) -> float:
    start = time.perf_counter()
    for call in calls:
        call()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
