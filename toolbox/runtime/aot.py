"""The float32 decode step compiled ahead of time (AOTInductor) into a shared library on disk.

Why not torch.compile for it: the frozen float32 graph (inductor's C++ GEMMs, which stream
float32 weights at one row about 1.5x as fast as oneDNN) holds prepacked weights that
inductor's caches cannot store, so every process compiled again (9-10 s for the embedded
model), and every step went through dynamo's guards and a Python wrapper (0.1 of the
embedded model's 0.36 ms). Exported once per checkpoint, thread count and CPU into a
library under ``$TOOLBOX_CACHE/compiled``, the step loads in milliseconds without
importing the compiler and runs from C++ (0.21 ms; docs/performance.md).

The library holds the frozen weights (the float32 model's size once more on disk) and
was built for one machine: the key covers the checkpoint's files, torch, the thread count
and the CPU. There are no guards at run time, so `AOTStep` checks what the export assumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .model import GPTNeoX

#: bump when what is exported changes (inputs, options)
FORMAT = 1

#: inductor's own C++ GEMMs on frozen weights, without the choices' report
OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP",
           "max_autotune_report_choices_stats": False, "autotune_num_choices_displayed": 0}


def use_inductor_cache_dir() -> None:
    """Keep inductor's compiled kernels and autotuning results with the toolbox's caches
    (``$TOOLBOX_CACHE/inductor``, which survives reboots unlike /tmp), unless the user chose."""
    from .quant import cache_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def example_inputs(module: GPTNeoX, rows: int):
    """Decode-step inputs that a compiled step generalises from: ``(ids, pos, cache_pos, key_mask,
    span, cache)``, the attention span as the length of an empty tensor.

    Every size is dynamic, so later prompts and caches reuse what these compile; what the
    step does assume holds for every cache the runtime makes: the key mask as wide as the
    cache, slots in multiples of 64 and more of them than the attention span (see
    `GPTNeoX.cache_slots`). The sizes here (320 slots, a span of 67) must not equal a fixed
    size of the model (heads, head width): dynamo gives equal sizes one symbol, which would
    pin the slots.
    """
    ctx, dev = module.config.max_position_embeddings, module.device
    slots = 320 if ctx >= 320 else max(ctx // 64 * 64, min(ctx, 5))
    span = 67 if slots >= 128 else 3
    pos = torch.full((rows, 1), span - 1, dtype=torch.long, device=dev)
    return (torch.zeros(rows, 1, dtype=torch.long, device=dev), pos, pos.clone(),
            torch.ones(rows, slots, dtype=torch.bool, device=dev), torch.empty(span, 0, device=dev),
            module.new_cache(rows, slots))


class _Exported(nn.Module):
    """The decode step as exported: the attention span comes as the length of an empty tensor,
    which keeps it a size the library reads at run time (an int input would be frozen)."""

    def __init__(self, module: GPTNeoX):
        super().__init__()
        self.module = module

    def forward(self, ids, pos, cache_pos, key_mask, span, cache):
        return self.module(ids, pos, cache_pos, key_mask, kv_len=span.shape[0], cache=cache)


def _cpu_id() -> str:
    """The CPU the library is built for (inductor compiles for the host's instruction set)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        first = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    except OSError:
        first = []
    import platform

    return hashlib.sha256("\n".join([platform.machine(), *first]).encode()).hexdigest()[:16]


def library_path(key: str | None, kind: int) -> Path | None:
    """Where the library of a checkpoint (``key``: `toolbox.runtime.quant.cache_key`) and a
    kind of step (1: one row, 2: two or more) lives; None without a key (built afresh)."""
    if key is None:
        return None
    from .quant import cache_root

    parts = {"format": FORMAT, "checkpoint": key, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "cpu": _cpu_id(), "capability": torch.backends.cpu.get_cpu_capability()}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "compiled" / digest / f"step-{kind}.so"


def build(module: GPTNeoX, kind: int, target: Path) -> None:
    """Export the decode step of ``kind`` and compile it into the library ``target`` (atomically)."""
    import torch._inductor  # the compiler: seconds to import, only when building
    from torch.export import Dim

    use_inductor_cache_dir()
    args = example_inputs(module, kind)
    S, K = Dim("slots", min=2, max=1 << 24), Dim("span", min=1, max=1 << 24)
    rows = Dim("rows", min=2, max=1 << 16) if kind > 1 else None
    per_row = {0: rows} if rows else None
    cache = [({0: rows, 2: S} if rows else {2: S},) * 2 for _ in args[5]]
    shapes = {"ids": per_row, "pos": per_row, "cache_pos": per_row,
              "key_mask": {0: rows, 1: S} if rows else {1: S}, "span": {0: K}, "cache": cache}
    with torch.no_grad():
        program = torch.export.export(_Exported(module), args, dynamic_shapes=shapes, strict=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(work / "step.pt2"),
                                                           inductor_configs=OPTIONS)
        with zipfile.ZipFile(package) as archive:  # the archive's one library holds code and weights
            (member,) = [n for n in archive.namelist() if n.endswith(".so")]
            with archive.open(member) as src, open(work / "step.so", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(work / "step.so", target)  # another process may have won: same contents
    finally:
        shutil.rmtree(work, ignore_errors=True)


class AOTStep:
    """One kind of decode step (1: one row; 2: two rows or more) from its library: called like
    the compiled step (`toolbox.runtime.cpu.CompiledDecode`) with the inputs it normalised."""

    def __init__(self, module: GPTNeoX, kind: int, key: str | None):
        path = library_path(key, kind)
        self.built = path is None or not path.is_file()
        if path is None:
            scratch = Path(tempfile.mkdtemp(prefix="toolbox-step-"))
            try:
                build(module, kind, scratch / "step.so")
                self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(scratch / "step.so"), 1)
            finally:  # loaded: the file may go
                shutil.rmtree(scratch, ignore_errors=True)
        else:
            if self.built:
                build(module, kind, path)
            self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
        self.kind, self.path = kind, path
        self._dtype = module.dtype

    def __call__(self, ids: Tensor, pos: Tensor, cache_pos: Tensor, key_mask: Tensor, kv_len: int, cache) -> Tensor:
        # what the export assumed and nothing checks in C++: a wrong layout would read wrong memory
        B = ids.shape[0]
        if (B > 1) != (self.kind > 1) or not all(t.is_contiguous() and t.dtype == self._dtype
                                                 for kv in cache for t in kv):
            raise ValueError(f"the compiled step takes contiguous {self._dtype} caches and "
                             f"{'one row' if self.kind == 1 else 'two rows or more'}; got {B} rows")
        flat = [ids, pos, cache_pos, key_mask, torch.empty(kv_len, 0)]
        flat.extend(t for kv in cache for t in kv)
        return self._runner.run(flat)[0]
