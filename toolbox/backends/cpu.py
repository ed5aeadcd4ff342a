"""Built-in backend `cpu`: the shared runtime on the CPU in float32 or bfloat16.

Option ``compile`` (``-o compile=1``, env ``TOOLBOX_CPU_COMPILE``; default off): decode
through a step compiled by inductor (`toolbox.runtime.cpu.compiled_decode`), compiled
while loading. It pays off on long generations: see docs/generate.md.
"""

from __future__ import annotations

from pathlib import Path

from toolbox.backend import Backend, BackendOption
from toolbox.hookspecs import hookimpl
from toolbox.types import GenerationParams, LoadOptions


class CPUBackend(Backend):
    name = "cpu"
    description = "PyTorch on the CPU (float32, bfloat16); --threads sets the thread count"
    options = (
        BackendOption("compile", "compile the decode step with inductor while loading (pays off on long runs)",
                      "TOOLBOX_CPU_COMPILE", "0"),
    )

    def load(self, checkpoint: Path, options: LoadOptions):
        import torch

        from toolbox.errors import ToolboxError
        from toolbox.runtime.cpu import compiled_decode, pack_linears
        from toolbox.runtime.loaded import RuntimeModel, checkpoint_tokenizer, load_module, torch_dtype

        if options.device not in (None, "cpu"):
            raise ToolboxError(f"the cpu backend runs on the CPU, not {options.device!r}")
        dtype = torch_dtype(options.dtype or "float32", ("float32", "bfloat16"))
        compiled = self.flag(options, "compile")
        if options.threads:
            torch.set_num_threads(options.threads)
        module = load_module(checkpoint, "cpu", dtype)
        if not compiled:  # inductor packs the weights itself, and better
            pack_linears(module)
        info = {"backend": self.name, "device": "cpu", "dtype": str(dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), "compiled": compiled}
        model = RuntimeModel(module, checkpoint_tokenizer(checkpoint), info,
                             decode_fn=compiled_decode(module) if compiled else None)
        if compiled:
            _compile_now(model)
        return model


def _compile_now(model) -> None:
    """Run a short generation so that the decode step compiles while loading (errors surface here)."""
    from toolbox.errors import ToolboxError

    try:
        for _ in model.generate_tokens([[0, 0]], GenerationParams(max_new_tokens=3, min_new_tokens=3, temperature=0.0)):
            pass
    except Exception as exc:  # noqa: BLE001 - inductor's failures (no C++ compiler, ...) are many
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ToolboxError(f"cannot compile the decode step ({first}); unset TOOLBOX_CPU_COMPILE") from None


@hookimpl
def register_backends():
    return [CPUBackend()]
