"""Built-in backend `cpu`: the shared runtime on the CPU in float32 or bfloat16.

Option ``compile`` (``-o compile=auto|1|0``, env ``TOOLBOX_CPU_COMPILE``; default auto):
decode through a step compiled by inductor (`toolbox.runtime.cpu.CompiledDecode`),
compiled while loading. ``auto`` compiles when the caller says a long run of generation
follows (``LoadOptions.workload == "generate"``: batch files, eval), where the seconds of
compiling are earned back; one-shot commands stay eager. See docs/generate.md.

Scoring's log-probabilities and ranks come from a small library compiled ahead of time
(`toolbox.runtime.score_kernel`): built once per machine where a long run of scoring
follows (``workload == "score"``: files, eval's log-likelihoods), used by every load once
it is on disk; ``compile=0`` keeps scoring eager too.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from toolbox.backend import Backend, BackendOption
from toolbox.hookspecs import hookimpl
from toolbox.types import LoadOptions

COMPILE_ENV = "TOOLBOX_CPU_COMPILE"


class CPUBackend(Backend):
    name = "cpu"
    description = "PyTorch on the CPU (float32, bfloat16); --threads sets the thread count"
    options = (
        BackendOption("compile", "compile the decode step with inductor while loading: auto (for long runs of "
                      "generation; scoring's kernel for long runs of scoring), 1 or 0", COMPILE_ENV, "auto"),
    )

    def load(self, checkpoint: Path, options: LoadOptions):
        import torch

        from toolbox.errors import ToolboxError
        from toolbox.runtime.aot import scheme
        from toolbox.runtime.cpu import pack_linears
        from toolbox.runtime.loaded import checkpoint_tokenizer, load_module, torch_dtype

        if options.device not in (None, "cpu"):
            raise ToolboxError(f"the cpu backend runs on the CPU, not {options.device!r}")
        dtype = torch_dtype(options.dtype or "float32", ("float32", "bfloat16"))
        compiled = compile_wanted(options)
        if options.threads:
            torch.set_num_threads(options.threads)
        module = load_module(checkpoint, "cpu", dtype)
        if not (compiled and scheme(module)):  # else inductor packs them its own way
            pack_linears(module)
        info = {"backend": self.name, "device": "cpu", "dtype": str(dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), "compiled": compiled}
        return runtime_model(module, checkpoint_tokenizer(checkpoint), info, compiled, options, checkpoint)


def compile_setting(options: LoadOptions) -> bool | None:
    """The ``compile`` option on the CPU: 1 or 0 as a bool, None for auto (the option, else
    ``TOOLBOX_CPU_COMPILE``, else auto; for `quant` too, whose declared ``compile`` is CUDA's)."""
    from toolbox.errors import ToolboxError

    value, source = options.extra.get("compile"), "option compile"
    if value is None and os.environ.get(COMPILE_ENV, "") != "":
        value, source = os.environ[COMPILE_ENV], COMPILE_ENV
    if isinstance(value, bool):
        return value
    v = str(value if value is not None else "auto").strip().lower()
    if v == "auto":
        return None
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ToolboxError(f"{source}: expected auto, 1 or 0, got {value!r}")


def compile_wanted(options: LoadOptions) -> bool:
    """Whether to compile: as set, or for ``auto`` when a long run of generation follows."""
    setting = compile_setting(options)
    return options.workload == "generate" if setting is None else setting


def runtime_model(module, tokenizer, info: dict, compiled: bool, options: LoadOptions, checkpoint: Path):
    """A `RuntimeModel` over `module` (loaded from ``checkpoint``), with its decode step
    compiled now when ``compiled`` (for batches of one row, and of several too when a long
    run of generation follows or the steps are compiled ahead of time, kept on disk per
    checkpoint)."""
    from toolbox.errors import ToolboxError
    from toolbox.runtime.cpu import CompiledDecode
    from toolbox.runtime.heap import keep_freed_memory
    from toolbox.runtime.loaded import RuntimeModel

    keep_freed_memory()
    kernel = score_kernel(options)
    if not compiled:
        return RuntimeModel(module, tokenizer, info, score_kernel=kernel)
    start = time.perf_counter()
    try:
        from toolbox.runtime.quant import cache_key

        step = CompiledDecode(module, key=cache_key(checkpoint, f"step-{info['dtype']}", "cpu"))
        # both kinds of step (one row; more) for long runs, and wherever they are kept on disk
        # (built once per machine; the second loaded at its first batch): a batch of rows would
        # otherwise build its kind mid-run
        step.warm((1, 2) if options.workload == "generate" or step.ahead else (1,))
    except Exception as exc:  # noqa: BLE001 - inductor's failures (no C++ compiler, ...) are many
        if compile_setting(options) is not None:  # asked for by name, not by auto
            raise ToolboxError(f"cannot compile the decode step ({_first_line(exc)}); use -o compile=0") from None
        print(f"toolbox: cannot compile the decode step ({_first_line(exc)}); decoding eagerly", file=sys.stderr)
        return RuntimeModel(module, tokenizer, info, score_kernel=kernel)
    how = "in" if step.built else "(ahead of time), loaded from the cache in"
    print(f"toolbox: decode step compiled by inductor ({info['dtype']}, {step.kind}) {how} "
          f"{time.perf_counter() - start:.1f} s; -o compile=0 to skip", file=sys.stderr)
    return RuntimeModel(module, tokenizer, {**info, "compiled": True}, decode_fn=step, batch_decode_fn=step,
                        score_kernel=kernel)


def score_kernel(options: LoadOptions):
    """The token-score library (`toolbox.runtime.score_kernel`) unless ``compile`` is 0: built
    now (once per machine, seconds) when a long run of scoring follows, else used when on
    disk; None (eager scoring) where it is neither or cannot be built."""
    if compile_setting(options) is False:
        return None
    from toolbox.runtime.score_kernel import load

    start = time.perf_counter()
    try:
        kernel = load(build_missing=options.workload == "score")
    except Exception as exc:  # noqa: BLE001 - as the decode step's
        print(f"toolbox: cannot compile the token scores ({_first_line(exc)}); scoring eagerly", file=sys.stderr)
        return None
    if kernel is not None and kernel.built:
        print(f"toolbox: token scores compiled by inductor in {time.perf_counter() - start:.1f} s (once per "
              "machine); -o compile=0 to skip", file=sys.stderr)
    return kernel


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@hookimpl
def register_backends():
    return [CPUBackend()]
