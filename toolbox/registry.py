"""The model registry: the four series variants plus the embedded model.

A plain data structure. Entries are `ModelSpec` records added with `Registry.register`;
plugins add theirs through the `register_models` hook the same way the built-ins do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

EMBEDDED_DIR = Path(__file__).parent / "data" / "embedded"


@dataclass(frozen=True)
class Architecture:
    """Shape facts of a GPT-NeoX checkpoint (the checkpoint's config.json stays the authority)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    context: int
    rotary_pct: float = 1.0
    rotary_base: float = 10000
    parameters: str = ""

    @classmethod
    def from_config(cls, config_file: Path) -> Architecture:
        from toolbox.config import NeoXConfig

        c = NeoXConfig.from_dir(config_file)
        return cls(layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads, intermediate=c.intermediate_size,
                   vocab=c.vocab_size, context=c.max_position_embeddings, rotary_pct=c.rotary_pct,
                   rotary_base=c.rotary_base)


@dataclass(frozen=True)
class GenerationDefaults:
    """Recommended generation settings for a variant (from its model card)."""

    do_sample: bool = True
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. `path` is set for checkpoints that ship locally; others come from the hub."""

    id: str
    role: str
    architecture: Architecture
    prompt_format: str  # "plain" or "rinna-chat"
    defaults: GenerationDefaults
    aliases: tuple[str, ...] = ()
    description: str = ""
    license: str = "MIT"
    path: Path | None = None
    notes: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path) if self.path else None
        data["aliases"] = list(self.aliases)
        return data


@dataclass
class Registry:
    """Registry entries by id and alias (names are matched case-insensitively)."""

    _specs: dict[str, ModelSpec] = field(default_factory=dict)
    _names: dict[str, str] = field(default_factory=dict)

    def register(self, spec: ModelSpec) -> None:
        """Add `spec`; a name already taken by another entry is an error."""
        for name in spec.names:
            owner = self._names.get(name.lower())
            if owner is not None:
                raise ValueError(f"model name {name!r} is already registered by {owner!r}")
        self._specs[spec.id] = spec
        for name in spec.names:
            self._names[name.lower()] = spec.id

    def get(self, name: str) -> ModelSpec | None:
        spec_id = self._names.get(name.lower())
        return self._specs[spec_id] if spec_id else None

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)


SERIES_ARCHITECTURE = Architecture(
    layers=36, hidden=2816, heads=22, intermediate=11264, vocab=32000, context=2048,
    parameters="3.6B",
)
INSTRUCTION_DEFAULTS = GenerationDefaults(max_new_tokens=128, temperature=0.7, repetition_penalty=1.1)


def builtin_models() -> list[ModelSpec]:
    """The series' four variants and the embedded model."""
    series = [
        ModelSpec(
            id="rinna/japanese-gpt-neox-3.6b",
            aliases=("3.6b",),
            role="pretrained",
            description="Pretrained on ~312.5B tokens of Japanese CC-100, C4 and Wikipedia.",
            architecture=SERIES_ARCHITECTURE,
            prompt_format="plain",
            defaults=GenerationDefaults(max_new_tokens=100, min_new_tokens=100, temperature=0.8),
        ),
        ModelSpec(
            id="rinna/japanese-gpt-neox-3.6b-instruction-sft",
            aliases=("sft",),
            role="instruction SFT",
            description="Instruction-following conversation model, supervised fine-tuning.",
            architecture=SERIES_ARCHITECTURE,
            prompt_format="rinna-chat",
            defaults=GenerationDefaults(max_new_tokens=128, temperature=0.7),
        ),
        ModelSpec(
            id="rinna/japanese-gpt-neox-3.6b-instruction-sft-v2",
            aliases=("sft-v2",),
            role="instruction SFT v2",
            description="Second SFT release of the conversation model.",
            architecture=SERIES_ARCHITECTURE,
            prompt_format="rinna-chat",
            defaults=INSTRUCTION_DEFAULTS,
        ),
        ModelSpec(
            id="rinna/japanese-gpt-neox-3.6b-instruction-ppo",
            aliases=("ppo",),
            role="SFT v2 + PPO",
            description="SFT-v2 further trained with PPO; repeats more than SFT.",
            architecture=SERIES_ARCHITECTURE,
            prompt_format="rinna-chat",
            defaults=INSTRUCTION_DEFAULTS,
            notes="The card also suggests temperature 0.9 with repetition_penalty 1.0.",
        ),
    ]
    embedded = ModelSpec(
        id="embedded",
        aliases=("neko",),
        role="embedded toy",
        description="A small GPT-NeoX trained on Soseki's 吾輩は猫である; ships with the package.",
        architecture=Architecture.from_config(EMBEDDED_DIR / "config.json"),
        prompt_format="plain",
        defaults=GenerationDefaults(max_new_tokens=64, temperature=0.8),
        license="MIT (text: public domain, Aozora Bunko)",
        path=EMBEDDED_DIR,
    )
    return [*series, embedded]
