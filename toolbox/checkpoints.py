"""Model resolution shared by every command: registry name, hub id or local directory -> files.

Hub checkpoints live in huggingface_hub's standard cache, so `HF_HOME`,
`HF_HUB_CACHE` and `HF_HUB_OFFLINE` behave as in every other Hugging Face tool.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from toolbox.errors import ToolboxError
from toolbox.registry import ModelSpec, Registry

DEFAULT_MODEL = "embedded"
TOKENIZER_FILE = "spiece.model"
METADATA_PATTERNS = ["*.json", TOKENIZER_FILE]
WEIGHT_PATTERNS = (["*.safetensors"], ["pytorch_model*.bin"])


@dataclass(frozen=True)
class ModelRef:
    """What a `--model` value names: a registry entry and/or a hub repository or local directory."""

    name: str
    spec: ModelSpec | None
    repo_id: str | None
    local_dir: Path | None
    revision: str | None = None


@cache
def registry() -> Registry:
    """The registry with the built-in entries and those added by plugins."""
    from toolbox.plugins import hook_results

    reg = Registry()
    for specs in hook_results("register_models"):
        for spec in specs or ():
            try:
                reg.register(spec)
            except ValueError as exc:
                raise ToolboxError(f"model registry: {exc}") from None
    return reg


@cache
def _core_registry() -> Registry:
    from toolbox.registry import builtin_models

    reg = Registry()
    for spec in builtin_models():
        reg.register(spec)
    return reg


def lookup(name: str) -> ModelSpec | None:
    """The registry entry called `name`; plugins are loaded only for names the core lacks.

    Plugins may not reuse built-in names, so the answer is the same either way; the
    tokenizer commands just skip the entry-point scan on their way to the default model.
    """
    return _core_registry().get(name) or registry().get(name)


def parse_model(name: str | None, revision: str | None = None) -> ModelRef:
    """Interpret a `--model` value without touching the network."""
    name = name or DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelRef(name, None, None, path, revision)
    spec = lookup(name)
    if spec is not None:
        if spec.path is not None:
            return ModelRef(spec.id, spec, None, spec.path, revision)
        return ModelRef(spec.id, spec, spec.id, None, revision)
    if path.exists():
        raise ToolboxError(f"model {name!r}: a file, not a checkpoint directory (config.json, weights, spiece.model)")
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local:
        raise ToolboxError(f"model {name!r}: no such directory")
    if name.count("/") == 1:
        return ModelRef(name, None, name, None, revision)
    raise ToolboxError(
        f"unknown model {name!r}: not a registry id or alias, hub id (owner/name) or directory; "
        "see `toolbox models list`"
    )


def prompt_format(ref: ModelRef) -> str:
    """"plain" or "rinna-chat": the registry's entry, else what a local checkpoint's config.json says
    under "toolbox" (`toolbox finetune lm` writes it for instruction-tuned models), else "plain"."""
    if ref.spec is not None:
        return ref.spec.prompt_format
    if ref.local_dir is not None:
        from toolbox.config import config_fields

        section = config_fields(ref.local_dir).get("toolbox")
        found = section.get("prompt_format") if isinstance(section, dict) else None
        if found in ("plain", "rinna-chat"):
            return found
    return "plain"


def tokenizer_file(ref: ModelRef) -> Path:
    """Path of the model's spiece.model, from the directory or the hub cache."""
    if ref.local_dir is not None:
        path = ref.local_dir / TOKENIZER_FILE
        if not path.is_file():
            raise ToolboxError(f"{ref.local_dir} has no {TOKENIZER_FILE} (a Hugging Face layout directory is expected)")
        return path
    return Path(_hub_snapshot(ref, METADATA_PATTERNS)) / TOKENIZER_FILE


def checkpoint_dir(ref: ModelRef) -> Path:
    """A local directory holding config.json, weights and spiece.model."""
    if ref.local_dir is not None:
        if not (ref.local_dir / "config.json").is_file():
            raise ToolboxError(f"{ref.local_dir} has no config.json (a Hugging Face layout directory is expected)")
        return ref.local_dir
    return Path(download(ref))


def download(ref: ModelRef, fetching: bool = False) -> str:
    """Fetch (or find in the cache) metadata, tokenizer and one set of weights; returns the snapshot dir.

    `fetching`: the user asked for the download itself (`toolbox download`), which changes the advice
    when the hub cannot be reached.
    """
    for weights in WEIGHT_PATTERNS:
        snapshot = _hub_snapshot(ref, METADATA_PATTERNS + weights, fetching)
        if any(Path(snapshot).glob(weights[0])):
            return snapshot
    raise ToolboxError(f"hub repository {ref.repo_id!r} has no safetensors or pytorch_model*.bin weights")


def _hub_snapshot(ref: ModelRef, patterns: list[str], fetching: bool = False) -> str:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns)
    except RepositoryNotFoundError:
        raise ToolboxError(f"hub repository {ref.repo_id!r} not found (or it is gated/private)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub is unreachable ({type(exc).__name__})"
        if fetching:
            advice = "unset HF_HUB_OFFLINE to allow downloads" if offline else "try again where the hub is reachable"
        else:
            advice = (f"run `toolbox download {ref.name}` where the hub is reachable, or pass --model with a "
                      "local checkpoint directory")
        raise ToolboxError(
            f"model {ref.repo_id!r} is not in the local cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
            f"and {why}: {advice}"
        ) from None
