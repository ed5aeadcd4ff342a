"""Built-in backend `cpu`: the shared runtime on the CPU in float32 or bfloat16."""

from __future__ import annotations

from pathlib import Path

from toolbox.backend import Backend, LoadOptions
from toolbox.hookspecs import hookimpl


class CPUBackend(Backend):
    name = "cpu"
    description = "PyTorch on the CPU (float32, bfloat16); --threads sets the thread count"

    def load(self, checkpoint: Path, options: LoadOptions):
        import torch

        from toolbox.errors import ToolboxError
        from toolbox.runtime.cpu import pack_linears
        from toolbox.runtime.loaded import RuntimeModel, checkpoint_tokenizer, load_module, torch_dtype

        if options.device not in (None, "cpu"):
            raise ToolboxError(f"the cpu backend runs on the CPU, not {options.device!r}")
        dtype = torch_dtype(options.dtype or "float32", ("float32", "bfloat16"))
        if options.threads:
            torch.set_num_threads(options.threads)
        module = pack_linears(load_module(checkpoint, "cpu", dtype))
        info = {"backend": self.name, "device": "cpu", "dtype": str(dtype).removeprefix("torch."),
                "threads": torch.get_num_threads()}
        return RuntimeModel(module, checkpoint_tokenizer(checkpoint), info)


@hookimpl
def register_backends():
    return [CPUBackend()]
