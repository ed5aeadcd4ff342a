"""Built-in backend `quant`: int8 and int4 weights for the shared runtime, on the CPU or CUDA.

The quantizers and the quantized-weight cache are in `toolbox.runtime.quant`. Options:
``quant_cache`` (1, 0 or auto: cache when the weight files hold at least 64 MiB) and, on
CUDA, the GPU decode options (`toolbox.backends.gpu`; ``compile`` defaults to on for
int8 there). On the CPU ``compile`` is the `cpu` backend's (auto, 1 or 0, env
``TOOLBOX_CPU_COMPILE``): the decode step compiled around the int8/int4 kernels.
"""

from __future__ import annotations

from pathlib import Path

from toolbox.backend import Backend, BackendOption
from toolbox.backends.gpu import GPU_OPTIONS, decoder_options
from toolbox.hookspecs import hookimpl
from toolbox.types import LoadOptions

SCHEMES = ("int8", "int4")


class QuantBackend(Backend):
    name = "quant"
    description = ("int8 or int4 weights; CPU: int8 torch dynamic quantization, int4 torch's int4 kernel "
                   "(groups of 32); CUDA: torchao")
    options = (
        BackendOption("quant_cache", "keep quantized weights on disk: 1, 0, or auto (weights of 64 MiB and more)",
                      "TOOLBOX_QUANT_CACHE", "auto"),
        *GPU_OPTIONS,
    )

    def load(self, checkpoint: Path, options: LoadOptions):
        import torch

        from toolbox.errors import ToolboxError
        from toolbox.runtime.loaded import checkpoint_tokenizer
        from toolbox.runtime.quant import cache_wanted, load_or_quantize

        scheme = options.dtype or "int8"
        if scheme not in SCHEMES:
            raise ToolboxError(f"the quant backend takes --dtype {' or '.join(SCHEMES)}, not {scheme!r}")
        device = options.device or "cpu"
        if device == "cpu":
            if options.threads:
                torch.set_num_threads(options.threads)
        elif device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ToolboxError(f"the quant backend cannot use {device!r}: no usable CUDA device")
        else:
            raise ToolboxError(f"the quant backend runs on cpu or cuda, not {device!r}")
        setting, source = self.setting(options, "quant_cache")
        try:
            use_cache = cache_wanted(checkpoint, setting)
        except ValueError as exc:
            raise ToolboxError(f"{source}: {exc}") from None
        gpu = decoder_options(self, options, default_compile=scheme == "int8") if device != "cpu" else None
        try:
            module, cached = load_or_quantize(checkpoint, scheme, device, use_cache)
        except (ValueError, KeyError, OSError) as exc:
            raise ToolboxError(f"cannot load {checkpoint}: {exc}") from None
        info = {"backend": self.name, "device": device, "dtype": scheme, "quantized_cache": cached}
        tokenizer = checkpoint_tokenizer(checkpoint)
        if gpu is None:
            from toolbox.backends.cpu import compile_wanted, runtime_model

            return runtime_model(module, tokenizer, info, compile_wanted(options), options, checkpoint)
        from toolbox.runtime.graphs import fast_runtime_model

        return fast_runtime_model(module, tokenizer, info, gpu)


@hookimpl
def register_backends():
    return [QuantBackend()]
