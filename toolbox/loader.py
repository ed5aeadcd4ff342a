"""Load a model for the model commands: resolve --model, pick the backend, load."""

from __future__ import annotations

from dataclasses import dataclass

from toolbox.backend import LoadedModel, LoadOptions, pick_backend
from toolbox.checkpoints import ModelRef, checkpoint_dir, parse_model
from toolbox.registry import GenerationDefaults


@dataclass
class Loaded:
    """A loaded model with what the commands need to know about it."""

    ref: ModelRef
    model: LoadedModel
    backend: str

    @property
    def chat_template(self) -> bool:
        """Whether prompts go through the instruction variants' template."""
        return self.ref.spec is not None and self.ref.spec.prompt_format == "rinna-chat"

    @property
    def defaults(self) -> GenerationDefaults:
        return self.ref.spec.defaults if self.ref.spec else GenerationDefaults()


def load(model: str | None, revision: str | None, backend: str, options: LoadOptions) -> Loaded:
    """Resolve `model`, pick `backend` ("auto" = cuda if present, else cpu) and load."""
    ref = parse_model(model, revision)
    chosen = pick_backend(backend)
    return Loaded(ref, chosen.load(checkpoint_dir(ref), options), chosen.name)
