"""Built-in backend `cuda`: the shared runtime on an NVIDIA GPU in float16 or bfloat16.

Weights go straight to the device: the module is built on the meta device and each
checkpoint tensor is read from the memory-mapped safetensors file onto the GPU (or
from a memory-mapped ``.bin``) and cast there, so the host never holds a copy.

Decoding runs through `toolbox.runtime.graphs.GraphedDecoder`: a static KV cache, the
decode step captured as a CUDA graph per batch size and attention span, sampling on
the device. Options (`toolbox.backends.gpu`): ``graphs`` (default on), ``compile``
(torch.compile the step before capture; default off: about 40 s per batch size),
``kv_bucket`` (attention span granularity, default 256). See docs/gpu.md.
"""

from __future__ import annotations

from pathlib import Path

from toolbox.backend import Backend
from toolbox.backends.gpu import GPU_OPTIONS, decoder_options
from toolbox.hookspecs import hookimpl
from toolbox.types import LoadOptions


def cuda_unavailable_reason() -> str | None:
    """Why CUDA can't be used here, or None. Skips importing torch when no driver is present."""
    import os

    if not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")):
        return "no CUDA device"
    import torch

    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return "CUDA driver present but no usable device"
    return None


class CUDABackend(Backend):
    name = "cuda"
    description = "PyTorch on an NVIDIA GPU (float16, bfloat16), static KV cache, CUDA-graph decode"
    options = GPU_OPTIONS

    def unavailable_reason(self) -> str | None:
        return cuda_unavailable_reason()

    def load(self, checkpoint: Path, options: LoadOptions):
        from toolbox.errors import ToolboxError
        from toolbox.runtime.graphs import fast_runtime_model
        from toolbox.runtime.loaded import checkpoint_tokenizer, load_module, torch_dtype

        device = options.device or "cuda"
        if not device.startswith("cuda"):
            raise ToolboxError(f"the cuda backend needs a cuda device, not {device!r}")
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise ToolboxError(f"backend 'cuda' is not available ({reason})")
        dtype = torch_dtype(options.dtype or "float16", ("float16", "bfloat16", "float32"))
        opts = decoder_options(self, options)
        module = load_module(checkpoint, device, dtype)  # safetensors opened on the device
        info = {"backend": self.name, "device": str(module.device), "dtype": str(dtype).removeprefix("torch.")}
        return fast_runtime_model(module, checkpoint_tokenizer(checkpoint), info, opts)


@hookimpl
def register_backends():
    return [CUDABackend()]
