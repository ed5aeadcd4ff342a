"""Load a Hugging Face GPT-NeoX checkpoint into our module's parameter names.

Supported layouts (looked for in this order): ``model.safetensors``; sharded
``model-0000x-of-0000y.safetensors`` (with or without ``model.safetensors.index.json``);
``pytorch_model.bin``; sharded ``pytorch_model-0000x-of-0000y.bin``. ``.bin`` files are
read with ``torch.load(weights_only=True, mmap=True)``; no remote code is ever run.
Each tensor is cast and moved on its own, so the host never holds a full fp32 copy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

# Buffers some checkpoints carry that are not parameters (we recompute or never need them).
_SKIP = re.compile(r"(\.attention\.(bias|masked_bias)|\.inv_freq)$")


def find_weight_files(model_dir: str | Path) -> list[Path]:
    """Return the checkpoint files of ``model_dir``, preferring safetensors over .bin."""
    d = Path(model_dir)
    for single, index, pattern in (
        ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"),
    ):
        if (d / single).is_file():
            return [d / single]
        if (d / index).is_file():
            weight_map = json.loads((d / index).read_text(encoding="utf-8")).get("weight_map", {})
            files = sorted({d / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{d / index}: shard {missing[0]} is missing")
            return files
        shards = sorted(d.glob(pattern))
        if shards:
            return shards
    raise FileNotFoundError(f"{d}: no model.safetensors, model-*.safetensors or pytorch_model*.bin found")


def hf_to_ours(name: str) -> str | None:
    """Map a checkpoint tensor name to our parameter name; None for buffers to skip."""
    if _SKIP.search(name):
        return None
    if name in ("embed_out.weight", "lm_head.weight"):
        return "embed_out.weight"
    return name.removeprefix("gpt_neox.")


def _device_arg(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def iter_tensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(checkpoint_name, tensor)``; safetensors are opened straight on ``device``."""
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt", device=_device_arg(device)) as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            yield from sd.items()
            del sd


def load_state_dict(
    model_dir: str | Path, expected: dict[str, tuple[int, ...]] | set[str], device: torch.device, dtype: torch.dtype,
    tied: bool = False,
) -> dict[str, torch.Tensor]:
    """Read every tensor of the checkpoint, renamed, cast to ``dtype`` on ``device``.

    ``expected`` maps our parameter names to the shapes config.json implies; missing or
    unexpected tensors, or a tensor of another shape, raise ValueError. With ``tied`` the
    output embedding is not read (it shares ``embed_in``).
    """
    device = torch.device(device)
    files = find_weight_files(model_dir)
    out: dict[str, torch.Tensor] = {}
    for name, t in iter_tensors(files, device):
        ours = hf_to_ours(name)
        if ours is None or (tied and ours == "embed_out.weight"):
            continue
        if ours not in expected:
            raise ValueError(f"{model_dir}: unexpected tensor {name!r} in the checkpoint")
        if isinstance(expected, dict) and tuple(t.shape) != tuple(expected[ours]):
            raise ValueError(f"{model_dir}: tensor {name!r} has shape {tuple(t.shape)}, but config.json implies "
                             f"{tuple(expected[ours])}")
        if t.is_floating_point():
            t = t.to(device=device, dtype=dtype)
        out[ours] = t
    missing = sorted(expected - out.keys() - ({"embed_out.weight"} if tied else set()))
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing)")
    return out
