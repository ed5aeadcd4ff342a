"""GPT-NeoX hyper-parameters, read from a Hugging Face ``config.json``: the one reader of that file
(the registry and the runtime both use it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: ``hidden_act`` values we implement (HF's "gelu" is the exact erf form).
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu")


@dataclass(frozen=True)
class NeoXConfig:
    """The GPT-NeoX hyper-parameters the runtime needs."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rotary_pct: float = 0.25  # transformers' default when the key is absent
    rotary_base: float = 10000.0
    use_parallel_residual: bool = True
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    hidden_act: str = "gelu"
    attention_bias: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dimensions that get rotary embedding (same rounding as HF)."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> NeoXConfig:
        """Build from a parsed config.json; ``source`` names the file in error messages."""

        def need(key):
            if key not in d or d[key] is None:
                raise ValueError(f"{source}: missing required key {key!r}")
            return d[key]

        archs = d.get("architectures")
        if archs is not None:
            if "GPTNeoXForCausalLM" not in archs:
                raise ValueError(f"{source}: 'architectures' is {archs}, expected GPTNeoXForCausalLM")
        elif d.get("model_type") != "gpt_neox":
            raise ValueError(f"{source}: not a GPT-NeoX config (no 'architectures', model_type={d.get('model_type')!r})")

        # rinna's own files: top-level rotary_pct / rotary_emb_base.
        # transformers >= 5 writes them under rope_parameters (older: rope_scaling).
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")
        # Where both exist, rope_parameters wins (as in transformers).
        rotary_pct = rope.get("partial_rotary_factor", d.get("rotary_pct", cls.rotary_pct))
        rotary_base = rope.get("rope_theta", d.get("rotary_emb_base", d.get("rope_theta", cls.rotary_base)))

        act = d.get("hidden_act", cls.hidden_act)
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {act!r} is not supported")
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        if hidden % heads:
            raise ValueError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            intermediate_size=int(need("intermediate_size")),
            max_position_embeddings=int(need("max_position_embeddings")),
            rotary_pct=float(rotary_pct),
            rotary_base=float(rotary_base),
            use_parallel_residual=bool(d.get("use_parallel_residual", cls.use_parallel_residual)),
            layer_norm_eps=float(d.get("layer_norm_eps", cls.layer_norm_eps)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", cls.tie_word_embeddings)),
            hidden_act=act,
            attention_bias=bool(d.get("attention_bias", cls.attention_bias)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> NeoXConfig:
        """Read ``<path>/config.json`` (``path`` may also be the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{file}: no config.json found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object")
        return cls.from_dict(data, source=str(file))


def config_fields(directory: str | Path) -> dict:
    """The whole ``<directory>/config.json`` as a dict, or {} when it is missing or not a JSON
    object: for the keys beyond the architecture that callers probe (the architectures list,
    the toolbox's own section), where a checkpoint without them is simply not that kind."""
    try:
        data = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
