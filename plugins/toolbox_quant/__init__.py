"""Built-in backend `quant`: int8 (and int4 on CUDA) weight quantization of the shared runtime.

On the CPU, int8 uses torch's dynamic quantization (int8 weights and int8 matmuls
with activations quantized on the fly), by far the fastest int8 path there. On CUDA,
torchao's weight-only int8/int4 configs. torchao has no int4 CPU kernel for this
torch, so int4 needs CUDA.
"""

from __future__ import annotations

from pathlib import Path

from toolbox.backend import Backend, LoadOptions
from toolbox.hookspecs import hookimpl

SCHEMES = ("int8", "int4")


def quantize_cpu_int8(module):
    """Swap every nn.Linear for torch's dynamically quantized int8 Linear (in place)."""
    import warnings

    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic is deprecated in favour of torchao
        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def quantize_cuda(module, scheme: str):
    """Weight-only int8/int4 through torchao (imported only here: it costs seconds)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if scheme == "int8" else Int4WeightOnlyConfig(group_size=128)
    quantize_(module, config)
    return module


class QuantBackend(Backend):
    name = "quant"
    description = "int8 weights on CPU (torch dynamic quantization) or CUDA (torchao); int4 on CUDA"

    def load(self, checkpoint: Path, options: LoadOptions):
        import torch

        from toolbox.errors import ToolboxError
        from toolbox.runtime.loaded import RuntimeModel, checkpoint_tokenizer, load_module

        scheme = options.dtype or "int8"
        if scheme not in SCHEMES:
            raise ToolboxError(f"the quant backend takes --dtype {' or '.join(SCHEMES)}, not {scheme!r}")
        device = options.device or "cpu"
        if device == "cpu":
            if scheme == "int4":
                raise ToolboxError("int4 needs CUDA: torchao has no int4 CPU kernel for this torch build")
            if options.threads:
                torch.set_num_threads(options.threads)
            module = quantize_cpu_int8(load_module(checkpoint, "cpu", torch.float32))
        elif device.startswith("cuda"):
            module = quantize_cuda(load_module(checkpoint, device, torch.bfloat16), scheme)
        else:
            raise ToolboxError(f"the quant backend runs on cpu or cuda, not {device!r}")
        info = {"backend": self.name, "device": device, "dtype": scheme}
        return RuntimeModel(module, checkpoint_tokenizer(checkpoint), info)


@hookimpl
def register_backends():
    return [QuantBackend()]
