"""The decode options the GPU backends (`cuda`, and `quant` on CUDA) share."""

from __future__ import annotations

from toolbox.backend import Backend, BackendOption
from toolbox.errors import ToolboxError
from toolbox.types import LoadOptions

GPU_OPTIONS = (
    BackendOption("graphs", "replay the decode step as CUDA graphs", "TOOLBOX_CUDA_GRAPHS", "1"),
    BackendOption("compile", "torch.compile the decode step before capture (about 40 s per batch size)",
                  "TOOLBOX_CUDA_COMPILE", None),
    BackendOption("kv_bucket", "attention span granularity in cache slots; 0 = the whole cache "
                  "(default 256, the whole cache with compile)", "TOOLBOX_CUDA_KV_BUCKET", None),
)


def decoder_options(backend: Backend, options: LoadOptions, default_compile: bool = False):
    """The `toolbox.runtime.graphs.DecoderOptions` the user's settings ask for."""
    from toolbox.runtime.graphs import AUTO_BUCKET, DecoderOptions

    compile_value, _ = backend.setting(options, "compile")
    compiled = backend.flag(options, "compile") if compile_value is not None else default_compile
    raw, source = backend.setting(options, "kv_bucket")
    if raw is None or raw.strip() == "":
        bucket = AUTO_BUCKET
    elif raw.strip().lower() in ("0", "none", "full"):
        bucket = None
    else:
        try:
            bucket = int(raw)
        except ValueError:
            bucket = 0
        if bucket < 1:
            raise ToolboxError(f"{source}: expected a number of cache slots >= 1 (or 0 for the whole cache), "
                               f"got {raw!r}")
    return DecoderOptions(graphs=backend.flag(options, "graphs"), compile=compiled, kv_bucket=bucket)
