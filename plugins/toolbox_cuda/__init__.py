"""Built-in backend `cuda`: the shared runtime on an NVIDIA GPU in float16 or bfloat16."""

from __future__ import annotations

from pathlib import Path

from toolbox.backend import Backend, LoadOptions
from toolbox.hookspecs import hookimpl


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
    description = "PyTorch on an NVIDIA GPU (float16, bfloat16), static KV cache"

    def unavailable_reason(self) -> str | None:
        return cuda_unavailable_reason()

    def load(self, checkpoint: Path, options: LoadOptions):
        from toolbox.errors import ToolboxError
        from toolbox.runtime.loaded import RuntimeModel, checkpoint_tokenizer, load_module, torch_dtype

        device = options.device or "cuda"
        if not device.startswith("cuda"):
            raise ToolboxError(f"the cuda backend needs a cuda device, not {device!r}")
        dtype = torch_dtype(options.dtype or "float16", ("float16", "bfloat16", "float32"))
        module = load_module(checkpoint, device, dtype)
        info = {"backend": self.name, "device": device, "dtype": str(dtype).removeprefix("torch.")}
        return RuntimeModel(module, checkpoint_tokenizer(checkpoint), info)


@hookimpl
def register_backends():
    return [CUDABackend()]
