"""Decode steps compiled ahead of time (AOTInductor) into shared libraries kept on disk.

Four kinds of model get one (`scheme`):

- float32: the weights frozen into the step and run by inductor's own C++ GEMMs, which
  stream float32 weights at one row about 1.5x as fast as oneDNN on an AMD EPYC and read
  weights that fit the caches 1.7x as fast on an Intel Xeon; weights past the caches
  stream from memory 8 % faster through oneDNN on that Xeon, so there both are built and
  the faster kept (`_candidates`), as for every batch step, where oneDNN's win from about
  eight rows. torch.compile could not keep that graph in inductor's
  caches (its prepacked weights do not pickle), so every process compiled it again (9-10 s
  for the embedded model); the library also holds the frozen copy of the weights;
- bfloat16, the same, on CPUs with AMX, where inductor's GEMMs run on AMX tiles: shape S
  decodes at 1.2-1.3x the compiled graph around oneDNN's kernels there (an Intel Xeon);
  without AMX they ran at half oneDNN's speed (an AMD EPYC), so bfloat16 stays on
  oneDNN's kernels there;
- int8 (torch's dynamic quantization, fbgemm) of small models (`INT8_LIMIT`), on CPUs
  with AMX: the same int8 weights (`_Int8Product`) frozen into inductor's weight-only
  int8 GEMM for the AMX tiles. Its packing widens them to 16 bits, so on larger models it
  is no faster than fbgemm's int8 and holds twice the bytes; on small ones, where a step
  is mostly the cost around the products, it is 2.5x the compiled graph around fbgemm
  (the embedded model, an Intel Xeon). Eager fbgemm still runs the prompts;
- int4 (`toolbox.runtime.int4`): the layers on torch's int4 kernel; the output layer
  (fbgemm's int8, which export cannot take) runs after the library, on its hidden state,
  but for small models on CPUs with AMX (`holds_head`).
  The library reads the module's own tensors (`_share_weights`), so the weights stay in
  memory once.

Built once per checkpoint, thread count, CPU and kind of step (one row; more) under
``$TOOLBOX_CACHE/compiled``, a library loads in milliseconds without importing the
compiler and runs from C++ without dynamo's guards or a Python wrapper (the embedded
float32 step 0.36 -> 0.20 ms, int4 0.28 -> 0.14 ms; docs/performance.md). A library that
holds the output layer also makes the greedy choice (`AOTStep.greedy`), so that a greedy
generation runs no Python between steps but its loop. Nothing checks the inputs in C++,
so `AOTStep` checks what the export assumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .model import GPTNeoX
from .sampling import pick_greedy

#: bump when what is exported changes (inputs, options)
FORMAT = 6

#: inductor's own C++ GEMMs over frozen weights (without the choices' report)
_CPP = ("inductor's C++ GEMMs", {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP",
                                 "max_autotune_report_choices_stats": False, "autotune_num_choices_displayed": 0})
#: oneDNN's GEMMs over weights prepacked when frozen
_ONEDNN = ("oneDNN's GEMMs", {"freezing": True})
#: per scheme, what its products may run on (name for the note, inductor's options), the
#: usual winner first: float32 weights larger than the CPU's caches, and batch steps, try both (`_candidates`);
#: int4 runs the eager kernel, its weights left as they are (shared)
CANDIDATES = {"float32": (_CPP, _ONEDNN), "bfloat16": (_CPP,), "int8": (_CPP,), "int4": (("the eager kernels", {}),)}

#: the most weight bytes a library may copy (float32: a second copy, in memory too)
SIZE_LIMIT = 2 << 30
#: the most int8 weight bytes of a model whose step goes ahead of time (see the module docstring)
INT8_LIMIT = 64 << 20


def amx() -> bool:
    """Whether the CPU has AMX tiles (and torch knows how to use them)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def _allow_amx() -> None:
    """Ask Linux for the AMX tile state (a process must, once, before it runs AMX code: a
    library built on AMX and loaded without the compiler would die of SIGILL)."""
    if amx():
        torch.cpu._init_amx()


def scheme(module: GPTNeoX) -> str | None:
    """``"float32"`` (every Linear a float32 `nn.Linear`), ``"bfloat16"`` or ``"int8"`` (every
    Linear a bfloat16 `nn.Linear`, or fbgemm's int8 with symmetric weights up to `INT8_LIMIT`,
    on a CPU with AMX), ``"int4"`` (every Linear of the layers an `Int4Linear`), or None: another kind, or
    weights past `SIZE_LIMIT`, which torch.compile handles (`toolbox.runtime.cpu.CompiledDecode`)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from .int4 import Int4Linear

    linears = _linears(module)
    inner = linears[:-1]
    plain = {m.weight.dtype if type(m) is nn.Linear else None for m in linears}
    if plain == {torch.float32} or (plain == {torch.bfloat16} and amx()):
        (dtype,) = plain
        found = str(dtype).removeprefix("torch.")
        size = sum(m.weight.numel() * dtype.itemsize for m in linears)
    elif amx() and all(type(m) is DynamicInt8Linear for m in linears):
        found, size = "int8", _int8_bytes(module)
        if size > INT8_LIMIT or not all(_symmetric(m) for m in linears):  # the size first: no unpacking
            return None
    elif inner and all(isinstance(m, Int4Linear) for m in inner):
        found = "int4"
        size = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    else:
        return None
    return found if size <= SIZE_LIMIT else None


def _linears(module: GPTNeoX) -> list[nn.Module]:
    """The layers' matrix products, then the output layer."""
    return [*(m for m in module.layers.modules() if hasattr(m, "in_features")), module.embed_out]


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


def _scales(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A quantized weight's scale and zero point per output row (one for all, repeated, when
    it is quantized per tensor)."""
    if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        n = weight.shape[0]
        return (torch.full((n,), weight.q_scale(), dtype=torch.float32),
                torch.full((n,), weight.q_zero_point(), dtype=torch.int64))
    return weight.q_per_channel_scales().float(), weight.q_per_channel_zero_points()


def holds_head(module: GPTNeoX, found: str) -> bool:
    """Whether the library of a model of scheme ``found`` runs the output layer. An int4
    model's (fbgemm's int8) runs after it, but for a small model on a CPU with AMX, where it
    goes in as an `_Int8Product` (as int8's `INT8_LIMIT`): the embedded model decoded 22 %
    faster so, shape S 5-20 % slower."""
    if found != "int4":
        return True
    return amx() and _int8_bytes(module) <= INT8_LIMIT and _symmetric(module.embed_out.linear)  # in `Int8Linear`


def _int8_bytes(module: GPTNeoX) -> int:
    """The model's product weights, a byte each (what `INT8_LIMIT` bounds)."""
    return sum(m.in_features * m.out_features for m in _linears(module))


def _symmetric(linear) -> bool:
    """Whether an fbgemm int8 Linear's weights have zero points of 0 (what `_Int8Product` takes)."""
    return not _scales(linear._weight_bias()[0])[1].any()


class _Int8Product(nn.Module):
    """An fbgemm int8 Linear as the library runs it: the same int8 weights in inductor's
    weight-only GEMM on bfloat16 activations, scaled (one scale per output, float32) and
    biased in float32 after it, so that the scales are not rounded to bfloat16."""

    def __init__(self, linear):
        super().__init__()
        weight, bias = linear._weight_bias()
        self.register_buffer("weight", weight.int_repr().contiguous())
        self.register_buffer("ones", torch.ones(weight.shape[0], dtype=torch.bfloat16))
        self.register_buffer("scale", _scales(weight)[0])
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).bfloat16(), self.weight, self.ones)
        y = y.float() * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


@contextmanager
def _exportable(module: GPTNeoX, found: str):
    """``module`` as it is exported (restored afterwards): int8 with every Linear an
    `_Int8Product`; int4 with its output layer (fbgemm's int8, whose packed weights export
    cannot take) as one, or without it where it runs after the library (`holds_head`)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    if found == "int4":
        head = _Int8Product(module.embed_out.linear) if holds_head(module, found) else nn.Identity()
        swaps = [(module, "embed_out", module.embed_out, head)]
    elif found == "int8":
        swaps = [(parent, name, child, _Int8Product(child)) for parent in module.modules()
                 for name, child in parent.named_children() if type(child) is DynamicInt8Linear]
    else:
        swaps = []
    try:
        for parent, name, _, new in swaps:
            setattr(parent, name, new)
        yield
    finally:
        for parent, name, old, _ in swaps:
            setattr(parent, name, old)


class _Exported(nn.Module):
    """The decode step as exported: the attention span comes as the length of an empty tensor,
    which keeps it a size the library reads at run time (an int input would be frozen). With
    the output layer (``head``): the logits, and the greedy choice from them and its
    log-probability (`pick_greedy`, ids marked in ``forbid`` excluded), which spares a greedy
    generation the dozen operations of `sample` a token; else the output layer's input."""

    def __init__(self, module: GPTNeoX, head: bool):
        super().__init__()
        self.module, self.head = module, head

    def forward(self, ids, pos, cache_pos, key_mask, span, forbid, cache):
        out = self.module._run(ids, pos, cache_pos, key_mask, span.shape[0], False, cache, head=self.head)
        if not self.head:
            return (out,)
        return (out, *pick_greedy(out[:, -1], forbid))


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
    """Where the library of a checkpoint (``key``: `toolbox.runtime.quant.cache_key` of the
    checkpoint and its scheme) and a kind of step (1: one row, 2: two or more) lives; None
    without a key (built afresh)."""
    if key is None:
        return None
    return compiled_path({"format": FORMAT, "checkpoint": key}, f"step-{kind}.so")


def compiled_path(parts: dict, name: str) -> Path:
    """Where a library named ``name`` that computes what ``parts`` describe is kept, for this
    torch, thread count and CPU (inductor compiles for all three): under ``$TOOLBOX_CACHE/compiled``."""
    from .quant import cache_root

    parts = {**parts, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu_id(),
             "capability": torch.backends.cpu.get_cpu_capability()}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "compiled" / digest / name


def build(module: GPTNeoX, kind: int, target: Path, found: str) -> None:
    """Export the decode step of ``kind`` of a model of scheme ``found`` (`scheme`) and compile
    it into the library ``target`` (atomically), on the faster of its `_candidates` when it
    has several; what it runs on is written beside it (`gemms`)."""
    import torch._inductor  # the compiler: seconds to import, only when building
    from torch.export import Dim

    use_inductor_cache_dir()
    args = _library_inputs(module, kind)
    S, K = Dim("slots", min=2, max=1 << 24), Dim("span", min=1, max=1 << 24)
    rows = Dim("rows", min=2, max=1 << 16) if kind > 1 else None
    per_row = {0: rows} if rows else None
    cache = [({0: rows, 2: S} if rows else {2: S},) * 2 for _ in args[6]]
    shapes = {"ids": per_row, "pos": per_row, "cache_pos": per_row,
              "key_mask": {0: rows, 1: S} if rows else {1: S}, "span": {0: K}, "forbid": None, "cache": cache}
    choices, head = _candidates(module, found, kind), holds_head(module, found)
    with scratch_beside(target) as work:
        libraries = []
        for i, (_, options) in enumerate(choices):
            with torch.no_grad(), warnings.catch_warnings(), _exportable(module, found):
                warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, inside export
                warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")  # a float16 embedding: fine
                program = torch.export.export(_Exported(module, head=head), args, dynamic_shapes=shapes,
                                              strict=False)  # again for each: freezing rewrites the program
                libraries.append(compile_library(program, options, work / f"{i}.so"))
        record, best = {}, 0
        if len(libraries) > 1:
            timed = args if kind == 1 else _library_inputs(module, BATCH_ROWS)
            seconds = [_step_seconds(path, timed) for path in libraries]
            best = seconds.index(min(seconds))
            record["step_seconds"] = {name: t for (name, _), t in zip(choices, seconds)}
        record["gemms"] = choices[best][0]
        (work / "step.json").write_text(json.dumps(record))
        # another process may have won: a library as good, and the note beside it first
        os.replace(work / "step.json", _record_path(target))
        os.replace(libraries[best], target)


@contextmanager
def scratch_beside(target: Path):
    """A scratch folder beside ``target``, removed afterwards: what is built there moves into
    place atomically (the same file system), whichever process finishes first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compile_library(program, options: dict, target: Path) -> Path:
    """Compile an exported ``program`` with inductor's ``options`` into the shared library
    ``target`` (written in place: callers build in a scratch folder and move it)."""
    import torch._inductor

    package = torch._inductor.aoti_compile_and_package(program, package_path=str(target.with_suffix(".pt2")),
                                                       inductor_configs=options)
    with zipfile.ZipFile(package) as archive:  # the archive's one library holds code and weights
        (member,) = [n for n in archive.namelist() if n.endswith(".so")]
        with archive.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _candidates(module: GPTNeoX, found: str, kind: int) -> tuple:
    """What the step of ``found`` and ``kind`` may run on (`CANDIDATES`). float32 weights
    larger than the CPU's largest cache stream from memory every step, and which GEMMs do
    that faster depends on the machine (shape S: oneDNN's 8 % ahead on an Intel Xeon,
    inductor's 1.4x ahead on an AMD EPYC), so both are built and timed; at one row weights
    that fit stay with inductor's (the embedded model: 1.7x oneDNN's on the Xeon). A batch's
    step tries both whatever the size: inductor's lead at two rows turns into oneDNN's
    from about eight (`BATCH_ROWS`)."""
    choices = CANDIDATES[found]
    if len(choices) > 1 and kind == 1 and sum(m.weight.nbytes for m in _linears(module)) <= _cache_bytes():
        return choices[:1]
    return choices


#: the rows a batch's step is timed at (a serving batch: 16 clients). The embedded model's
#: float32 step on the Intel Xeon at one thread: inductor's GEMMs 0.95 against oneDNN's 1.46
#: ms at two rows, 4.3 against 3.3 at 16 and 19.6 against 13.4 at 64 (docs/performance.md)
BATCH_ROWS = 16


def _library_inputs(module: GPTNeoX, rows: int) -> tuple:
    """`example_inputs` of ``rows`` rows as the library takes them (`_Exported`: every id allowed)."""
    ids, pos, cache_pos, key_mask, span, cache = example_inputs(module, rows)
    return ids, pos, cache_pos, key_mask, span, torch.zeros(module.config.vocab_size), cache


def _cache_bytes() -> int:
    """The size of the CPU's largest cache (0 when the system does not say)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=0)


def _step_seconds(path: Path, args) -> float:
    """The fastest of ten runs of a library's step on ``args`` (as exported), after two."""
    _allow_amx()
    runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
    inputs = [*args[:6], *[t for kv in args[6] for t in kv]]
    times = []
    for _ in range(12):
        start = time.perf_counter()
        runner.run(inputs)
        times.append(time.perf_counter() - start)
    return min(times[2:])


def _record_path(library: Path) -> Path:
    """Where what a library runs on is written (`build`)."""
    return library.with_suffix(".json")


def gemms(library: Path, found: str) -> str:
    """What the products of a library of scheme ``found`` run on, as `build` wrote it."""
    try:
        return json.loads(_record_path(library).read_text())["gemms"]
    except (OSError, ValueError, KeyError):
        return CANDIDATES[found][0][0]


def _build_missing(module: GPTNeoX, kind: int, path: Path, found: str) -> bool:
    """Build the library ``path`` unless it is there; True when it was built."""
    if path.is_file():
        return False
    build(module, kind, path, found)
    return True


def prepare(module: GPTNeoX, kind: int, key: str, found: str) -> bool:
    """Build the library of ``kind`` now unless it is on disk (True: built), without loading
    it: a library holds its own copy of frozen weights, so a kind is loaded (in milliseconds)
    only when a step of it runs."""
    return _build_missing(module, kind, library_path(key, kind), found)


def _share_weights(runner, module: GPTNeoX) -> None:
    """Point the library's constants at ``module``'s own tensors and free its copies (int4:
    the constants are the module's state as it was exported). The few constants inductor
    made itself (scalars) keep their values."""
    names = runner.get_constant_names_to_original_fqns()
    active = runner.extract_constants_map(False)
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    mapping = {}
    for name, fqn in names.items():
        own = state.get(fqn.removeprefix("module."))
        mapping[name] = own if own is not None else active[fqn].clone()
    del active
    runner.update_constant_buffer(mapping, True, True, True)  # the inactive set, all of it, ours
    runner.swap_constant_buffer()
    runner.free_inactive_constant_buffer()


class AOTStep:
    """One kind of decode step (1: one row; 2: two rows or more) from its library: called like
    the compiled step (`toolbox.runtime.cpu.CompiledDecode`) with the inputs it normalised."""

    def __init__(self, module: GPTNeoX, kind: int, key: str | None, found: str):
        """``found``: the model's `scheme`; ``key``: see `library_path` (None: built in a scratch folder)."""
        _allow_amx()
        path = library_path(key, kind)
        scratch = None if path else Path(tempfile.mkdtemp(prefix="toolbox-step-"))
        path = path or scratch / "step.so"
        try:
            self.built = _build_missing(module, kind, path, found)
            try:
                self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
            except RuntimeError:  # a damaged file (a disk error, a copy cut short): built again
                if self.built:
                    raise
                self.built = True
                build(module, kind, path, found)
                self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
            #: what the products run on (for the one-line note)
            self.gemms = gemms(path, found)
        finally:  # loaded: a scratch file may go
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        self.kind = kind
        self._head = None if holds_head(module, found) else module.embed_out
        if found == "int4":
            _share_weights(self._runner, module)
        self._dtype = module.dtype
        #: every id allowed (`pick_greedy`'s forbid, for a step whose choice is not used)
        self._allowed = torch.zeros(module.config.vocab_size)
        #: the cache last checked and its tensors in the library's order (the same list every step of a
        #: generation: checked once); the attention spans as empty tensors, by length
        self._cache, self._tensors, self._spans = None, [], {}

    def __call__(self, ids: Tensor, pos: Tensor, cache_pos: Tensor, key_mask: Tensor, kv_len: int, cache) -> Tensor:
        """The logits ``[B,1,V]``."""
        out = self.run(ids, pos, cache_pos, key_mask, kv_len, cache, self._allowed)[0]
        return out if self._head is None else self._head(out).float()

    def greedy(self, ids: Tensor, pos: Tensor, cache_pos: Tensor, key_mask: Tensor, kv_len: int, cache,
               forbid: Tensor) -> tuple[Tensor, Tensor]:
        """The greedy tokens ``[B]`` and their log-probabilities ``[B]`` (`pick_greedy`); only from a
        library that `holds_head`."""
        _, tokens, logprobs = self.run(ids, pos, cache_pos, key_mask, kv_len, cache, forbid)
        return tokens, logprobs

    def run(self, ids: Tensor, pos: Tensor, cache_pos: Tensor, key_mask: Tensor, kv_len: int, cache,
            forbid: Tensor) -> list[Tensor]:
        """The library's outputs (`_Exported`)."""
        # what the export assumed and nothing checks in C++: a wrong layout would read wrong memory
        if cache is not self._cache:
            tensors = [t for kv in cache for t in kv]
            if not all(t.is_contiguous() and t.dtype == self._dtype for t in tensors):
                raise ValueError(f"the compiled step takes contiguous {self._dtype} caches")
            self._cache, self._tensors = cache, tensors
        if (ids.shape[0] > 1) != (self.kind > 1):
            raise ValueError(f"this compiled step takes {'one row' if self.kind == 1 else 'two rows or more'}, "
                             f"not {ids.shape[0]}")
        span = self._spans.get(kv_len)
        if span is None:
            span = self._spans[kv_len] = torch.empty(kv_len, 0)
        return self._runner.run([ids, pos, cache_pos, key_mask, span, forbid, *self._tensors])
