"""Weight quantization of the shared runtime (the `quant` backend's machinery), and its cache.

On the CPU, int8 uses torch's dynamic quantization (int8 weights and int8 matmuls
with activations quantized on the fly through fbgemm), the fastest int8 kernel there at
batch 1 (measured against torch's weight-only ``_weight_int8pack_mm``, eager and compiled,
oneDNN's u8s8 ``qlinear`` and ``_int_mm``: docs/performance.md). int4 on the CPU is
weight-only in groups of 32 on torch's own int4 CPU kernel (`toolbox.runtime.int4`). On
CUDA, torchao's weight-only configs on a bfloat16 model: int8 per output channel
(``Int8WeightOnlyConfig``), int4 in groups of 128 along the input (``Int4WeightOnlyConfig``,
tinygemm's ``tile_packed_to_4d`` packing, which runs on torch's own CUDA kernel and
needs bfloat16 activations).

What gets quantized: every Linear, the output head ``embed_out`` included. With int4
the head is int8 instead (it is 2.5 % of the 3.6B's weights and the layer where int4
rounding costs the most accuracy); a Linear whose input width is not a multiple of
the group size is int8 too. On the CPU the input embedding stays as stored for int8 and
is int8 per row for int4. The LayerNorms and every bias are in the activation dtype
(bfloat16 on CUDA and for int4 on the CPU, float32 for int8 on the CPU): the bias is
added after the matmul in that dtype.

On CUDA the backend decodes through CUDA graphs like `cuda` (`toolbox.runtime.graphs`);
``compile`` defaults to on for int8: torchao's int8 weight-only matmul is a dequantize
then a bf16 matmul in eager mode (slower than fp16), and only Inductor fuses the two
into one kernel that reads the int8 weights once. int4 (tinygemm) is fused already.

Quantized weights are cached (``quantized_cache_dir``), so a later start skips both the
full-precision load and the quantization (the backend's ``quant_cache`` option decides
when; ``cache_wanted``). The cache lives in ``$TOOLBOX_CACHE/quantized`` (default
``$XDG_CACHE_HOME/toolbox``, else ``~/.cache/toolbox``), one directory per checkpoint,
scheme and library versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

INT4_GROUP = 128
CACHE_FORMAT = 2  # 2: the CPU schemes store one file per layer
AUTO_CACHE_BYTES = 64 << 20


def quantize_cpu_int8(module):
    """Swap every nn.Linear for torch's dynamically quantized int8 Linear, one at a time (in place).

    The module may be loaded in the checkpoint's 16-bit dtype: each Linear is widened to
    float32 only while it is quantized, so a float32 copy of the whole model never exists.
    The layer norms end in float32, as the int8 Linears expect; the input embedding stays
    as stored (its rows are widened as they are looked up), which halves its memory.
    """

    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import default_dynamic_qconfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's int8 dynamic quantization is deprecated for torchao
        # Hold (parent, name) only: a reference to each widened Linear would keep every
        # float32 copy alive until the end, the very peak this avoids.
        slots = [(parent, name) for parent in module.modules() for name, child in parent.named_children()
                 if type(child) is torch.nn.Linear]
        for parent, name in slots:
            linear = getattr(parent, name).float()
            linear.qconfig = default_dynamic_qconfig
            setattr(parent, name, DynamicInt8Linear.from_float(linear))
            del linear
    for name, child in module.named_children():
        if name != "embed_in":
            child.float()
    # an owned copy: a view of the memory-mapped checkpoint would keep the whole mapping
    # resident (every page read while quantizing: 7 GB of the 3.6B's fp16 file)
    module.embed_in.weight = torch.nn.Parameter(module.embed_in.weight.detach().clone(), requires_grad=False)
    return module


def release_freed_memory() -> None:
    """Give memory freed by Python and torch back to the OS (glibc keeps it otherwise)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def checkpoint_float_dtype(checkpoint: Path):
    """The dtype the checkpoint's weights are stored in, when it is a 16-bit one (else float32)."""
    import json

    import torch

    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    stored = config.get("torch_dtype") or config.get("dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(stored, torch.float32)


def quantize_cuda(module, scheme: str):
    """Weight-only int8/int4 through torchao (imported only here: it costs seconds).

    ``module`` must be bfloat16. int4: every Linear but the head whose input width is a
    multiple of INT4_GROUP; the rest (the head included) int8. int8: every Linear.
    """
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if module.dtype != torch.bfloat16:
        raise ValueError(f"torchao weight-only quantization here expects a bfloat16 model, not {module.dtype}")
    linears = {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    int4 = set()
    if scheme == "int4":
        int4 = {n for n, m in linears.items() if n != "embed_out" and m.in_features % INT4_GROUP == 0}
        quantize_(
            module,
            Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d",
                                 set_inductor_config=False),
            filter_fn=lambda m, fqn: fqn in int4,
        )
    elif scheme != "int8":
        raise ValueError(f"unknown scheme {scheme!r}")
    rest = set(linears) - int4
    quantize_(module, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, fqn: fqn in rest)
    return module


# --- the quantized-weight cache -------------------------------------------------


def cache_root() -> Path:
    """``$TOOLBOX_CACHE``, else ``$XDG_CACHE_HOME/toolbox``, else ``~/.cache/toolbox``."""
    root = os.environ.get("TOOLBOX_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "toolbox"


def _weight_files(checkpoint: Path) -> list[Path]:
    from toolbox.runtime.weights import find_weight_files

    return find_weight_files(checkpoint)


def cache_key(checkpoint: Path, scheme: str, device_type: str) -> str:
    """A hash of what the quantized weights depend on: the checkpoint's files (resolved
    path, size, mtime), its config.json, the scheme and the library versions."""
    import torch

    parts = {
        "format": CACHE_FORMAT,
        "scheme": scheme,
        "device": device_type,
        "torch": torch.__version__,
        "config": hashlib.sha256((Path(checkpoint) / "config.json").read_bytes()).hexdigest(),
        "files": [],
    }
    for f in _weight_files(checkpoint):
        st = f.stat()
        parts["files"].append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    if device_type == "cuda":
        import torchao

        parts.update(torchao=torchao.__version__, cuda=torch.version.cuda, hip=getattr(torch.version, "hip", None),
                     int4_group=INT4_GROUP)
    else:
        parts["engine"] = torch.backends.quantized.engine
        if scheme == "int4":  # the int4 kernel's packed layout follows the CPU build
            from toolbox.runtime.int4 import GROUP

            parts.update(cpu=torch.backends.cpu.get_cpu_capability(), int4_group=GROUP)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def quantized_cache_dir(checkpoint: Path, scheme: str, device_type: str) -> Path:
    return cache_root() / "quantized" / cache_key(checkpoint, scheme, device_type)


def cache_wanted(checkpoint: Path, setting: str | None) -> bool:
    """``setting``: "1" always, "0" never, "auto"/None when the weight files hold at least 64 MiB."""
    value = (setting or "auto").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value != "auto":
        raise ValueError(f"expected 1, 0 or auto, got {setting!r}")
    try:
        return sum(f.stat().st_size for f in _weight_files(checkpoint)) >= AUTO_CACHE_BYTES
    except OSError:
        return False


def _write_atomically(target: Path, write) -> None:
    """Run ``write(tmp_dir)``, then rename tmp_dir to ``target`` (another writer may win)."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # target exists (written meanwhile): keep that one
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _source_info(checkpoint: Path, scheme: str, device_type: str) -> dict:
    import torch

    return {"checkpoint": str(Path(checkpoint).resolve()), "scheme": scheme, "device": device_type,
            "torch": torch.__version__, "format": CACHE_FORMAT}


def save_quantized(module, directory: Path, scheme: str, checkpoint: Path | None = None) -> None:
    """Store a quantized module's state in ``directory`` (created atomically).

    torch dynamic quantization and the int4 kernel (the CPU path): ``model.<module>.pt`` for
    each layer and each other part of the model, a plain ``torch.save`` of its state dict
    (int8 or packed int4 tensors, scales, embedding, norms; read back with weights_only=True),
    so that loading holds one layer's unpacked weights at a time, not the whole model's.
    torchao (the CUDA path): ``model.safetensors`` through torchao's safetensors flattening
    (tensor data plus JSON metadata; no pickle).
    """
    import torch

    device_type = module.device.type
    info = _source_info(checkpoint or Path("."), scheme, device_type)
    dynamic = _is_dynamic_quantized(module)

    def write(tmp: Path):
        if dynamic:
            for name, part in _parts(module):
                torch.save(part.state_dict(), tmp / f"model.{name}.pt")
        else:
            import torchao
            from safetensors.torch import save_file
            from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

            info["torchao"] = torchao.__version__
            tensors, metadata = flatten_tensor_state_dict(_untied_state(module))
            save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)
        (tmp / "source.json").write_text(json.dumps(info, indent=1), encoding="utf-8")

    _write_atomically(Path(directory), write)


def _is_dynamic_quantized(module) -> bool:
    """True for torch's dynamic quantized Linears (the CPU schemes), False for torchao weights."""
    import torch.ao.nn.quantized.dynamic as nnqd

    return any(isinstance(m, nnqd.Linear) for m in module.modules())


def _untied_state(module) -> dict:
    """The state dict without a tied output head (safetensors refuses shared tensors)."""
    state = module.state_dict()
    if module.embed_out.weight is module.embed_in.weight:
        state.pop("embed_out.weight", None)
    return state


def load_quantized(directory: Path, checkpoint: Path, device: str):
    """Rebuild the quantized module saved by `save_quantized` (for ``checkpoint``'s config) on ``device``."""
    import torch

    from toolbox.config import NeoXConfig
    from toolbox.runtime.model import GPTNeoX

    config = NeoXConfig.from_dir(checkpoint)
    directory = Path(directory)
    with torch.device("meta"):
        module = GPTNeoX(config)
    module.requires_grad_(False)
    dev = torch.device(device)
    if not (directory / "model.safetensors").is_file():  # torch dynamic quantization and the int4 kernel (CPU)
        if dev.type != "cpu":
            raise ValueError(f"{directory}: CPU-quantized weights cannot be loaded on {dev}")
        scheme = json.loads((directory / "source.json").read_text(encoding="utf-8")).get("scheme")
        # quantized tensors (the placeholders, the stored weights) draw torch's deprecation
        # warnings and still go through TypedStorage: a user sees none of that
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if scheme == "int4":
                from toolbox.runtime.int4 import int4_skeleton

                int4_skeleton(module)
            else:
                _int8_skeleton(module)
            _load_parts(module, directory)
        release_freed_memory()
    else:
        from safetensors import safe_open
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        from toolbox.runtime.weights import _device_arg

        with safe_open(str(directory / "model.safetensors"), framework="pt", device=_device_arg(dev)) as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
        if leftover:
            raise ValueError(f"{directory}: unexpected tensors {sorted(leftover)[:3]}")
        tied = "embed_out.weight" not in state
        module.load_state_dict(state, strict=not tied, assign=True)
        if tied:
            module.embed_out.weight = module.embed_in.weight
    module._init_rotary(dev)
    return module.eval()


def _parts(module) -> list:
    """``(name, module)`` of what a CPU cache entry stores a file each of: every layer, and
    each other child of the model (the embeddings, the final norm, the output layer)."""
    return ([(name, child) for name, child in module.named_children() if name != "layers"]
            + [(f"layers.{i}", layer) for i, layer in enumerate(module.layers)])


def _load_parts(module, directory: Path) -> None:
    """Load the files written by `save_quantized` into ``module`` (strict), on every thread.

    Read, not memory-mapped (the packed int8 weights keep a reference to their bias, which
    would keep a mapping resident). Loading an int8 Linear packs its weight for fbgemm on
    one core, most of a load from the cache, so parts load side by side (shape S: 0.9 ->
    0.64-0.73 s on two threads); each part's unpacked weights go once it is loaded, so
    the peak is the packed model plus a layer a thread (the 3.6B's whole state read at
    once doubled it).
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    parts = _parts(module)
    missing = [name for name, _ in parts if not (directory / f"model.{name}.pt").is_file()]
    if missing:
        raise ValueError(f"{directory}: no weights for {missing[0]}")

    def load(name: str, part) -> None:
        state = torch.load(directory / f"model.{name}.pt", map_location="cpu", weights_only=True)
        part.load_state_dict(state, strict=True, assign=True)

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for done in [pool.submit(load, name, part) for name, part in parts]:
            done.result()


def _int8_skeleton(module) -> None:
    """Replace every nn.Linear by an empty dynamically quantized one (weights come from a state dict).

    Built at 1x1 and given the real feature counts: loading the state dict packs the real
    weights, so packing a full-size placeholder first would be wasted work.
    """
    import torch
    import torch.ao.nn.quantized.dynamic as nnqd

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                q = nnqd.Linear(1, 1, bias_=child.bias is not None, dtype=torch.qint8)
                q.in_features, q.out_features = child.in_features, child.out_features
                setattr(parent, name, q)


def load_or_quantize(checkpoint: Path, scheme: str, device: str, use_cache: bool):
    """The quantized module, from the cache when there; returns ``(module, cache_status)``.

    cache_status: "hit", "written", "off", or "error: ..." (a failed write never fails the load).
    """
    import torch

    from toolbox.runtime.loaded import load_module

    device_type = torch.device(device).type
    directory = quantized_cache_dir(checkpoint, scheme, device_type) if use_cache else None
    if directory is not None and (directory / "source.json").is_file():
        try:
            return load_quantized(directory, checkpoint, device), "hit"
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry: quantize again
            print(f"toolbox: ignoring the quantized-weight cache {directory}: {exc}", file=sys.stderr)
    if device_type == "cpu":
        module = load_module(checkpoint, "cpu", checkpoint_float_dtype(checkpoint))
        if scheme == "int4":
            from toolbox.runtime.int4 import quantize_cpu_int4

            module = quantize_cpu_int4(module)
        else:
            module = quantize_cpu_int8(module)
        release_freed_memory()
    else:
        module = quantize_cuda(load_module(checkpoint, device, torch.bfloat16), scheme)
    if directory is None:
        return module, "off"
    try:
        if directory.exists():
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
        save_quantized(module, directory, scheme, checkpoint)
        return module, "written"
    except Exception as exc:  # noqa: BLE001
        print(f"toolbox: could not write the quantized-weight cache {directory}: {exc}", file=sys.stderr)
        return module, f"error: {exc}"
