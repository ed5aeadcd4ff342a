"""Request settings + a model's registry defaults -> `GenerationParams`: the one place for it.

Three front ends fill unset settings differently, so each is a named policy:

- ``"toolbox"`` (the CLI and the Python API): every unset setting takes the registry's
  value for the variant (its model card's recommendation), sampling included;
- ``"openai"``: OpenAI's documented defaults where the API defines one (temperature 1,
  top_p 1), the registry's for the extensions (top_k, repetition penalty, min tokens);
- ``"azure"``: transformers' names (do_sample, ...): do_sample false is greedy,
  otherwise the registry's temperature, or 1 where the registry itself would not sample.

Numbers are checked here too, for every front end alike: a value with no sensible
meaning (NaN, a negative temperature, a seed beyond 64 bits, more min than max tokens)
is a `ParamError` naming the setting; values the kernels cannot take literally but whose
meaning is clear are brought into range (a temperature below `MIN_TEMPERATURE` samples
greedily, its limit; penalties and temperatures are capped where the distribution no
longer changes measurably), so no request can make the shared decode step overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from toolbox.errors import ToolboxError
from toolbox.registry import GenerationDefaults
from toolbox.types import GenerationParams

POLICIES = ("toolbox", "openai", "azure")

#: Temperatures below this sample greedily: logits divided by less overflow float32.
MIN_TEMPERATURE = 1e-4
#: Above this the distribution is uniform over the kept tokens to float32 precision.
MAX_TEMPERATURE = 1e4
#: Repetition penalties are kept within [1/PENALTY_LIMIT, PENALTY_LIMIT].
PENALTY_LIMIT = 100.0
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_SAMPLES = 64
MAX_TOP_LOGPROBS = 20


class ParamError(ToolboxError):
    """A generation setting with no sensible meaning; `setting` names it (the front end's own name
    is put in front of the message by whoever knows it: `--temperature`, `parameters.temperature`)."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"{setting}: {message}")
        self.setting, self.reason = setting, message


@dataclass(frozen=True)
class Settings:
    """What a request asked for; None = not given (the policy decides)."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    greedy: bool = False  # toolbox: --greedy
    do_sample: bool | None = None  # azure
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    top_logprobs: int = 0


def generation_params(settings: Settings, defaults: GenerationDefaults, policy: str = "toolbox") -> GenerationParams:
    """The `GenerationParams` a request means under `policy` (see the module docstring)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    s, d = settings, defaults

    def pick(value, default):
        return default if value is None else value

    if policy == "openai":
        temperature, top_p = pick(s.temperature, 1.0), pick(s.top_p, 1.0)
    elif policy == "azure":
        if s.do_sample is False:
            temperature = 0.0
        elif s.temperature is not None:
            temperature = s.temperature
        elif s.do_sample:
            temperature = d.temperature if d.do_sample else 1.0
        else:
            temperature = d.temperature if d.do_sample else 0.0
        top_p = pick(s.top_p, d.top_p)
    else:
        temperature = 0.0 if s.greedy else pick(s.temperature, d.temperature if d.do_sample else 0.0)
        top_p = pick(s.top_p, d.top_p)
    max_new = pick(s.max_new_tokens, d.max_new_tokens)
    _check_int("max_new_tokens", max_new, 1)
    if s.min_new_tokens is not None:
        _check_int("min_new_tokens", s.min_new_tokens, 0)
        if s.min_new_tokens > max_new:
            raise ParamError("min_new_tokens", f"{s.min_new_tokens} is more than max_new_tokens ({max_new})")
        min_new = s.min_new_tokens
    else:
        min_new = min(d.min_new_tokens, max_new)  # the registry's minimum never outgrows a smaller maximum
    return GenerationParams(
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        temperature=_temperature(temperature),
        top_p=_top_p(top_p),
        top_k=_check_int("top_k", pick(s.top_k, d.top_k), 0),
        repetition_penalty=_penalty(pick(s.repetition_penalty, d.repetition_penalty)),
        seed=_seed(s.seed),
        stop=tuple(x for x in s.stop if x),
        n=_check_int("n", s.n, 1, MAX_SAMPLES),
        top_logprobs=_check_int("top_logprobs", s.top_logprobs, 0, MAX_TOP_LOGPROBS),
    )


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(name, f"expected a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ParamError(name, "NaN is not a number it can use")
    return value


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"expected a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ParamError(name, f"must be {bounds}, got {value}")
    return value


def _temperature(value) -> float:
    t = _number("temperature", value)
    if t < 0:
        raise ParamError("temperature", f"must be >= 0 (0 = greedy), got {value}")
    if t < MIN_TEMPERATURE:
        return 0.0
    return min(t, MAX_TEMPERATURE)


def _top_p(value) -> float:
    p = _number("top_p", value)
    if not 0 < p <= 1:
        raise ParamError("top_p", f"must be in (0, 1], got {value}")
    return p


def _penalty(value) -> float:
    r = _number("repetition_penalty", value)
    if r <= 0 or math.isinf(r):
        raise ParamError("repetition_penalty", f"must be a positive number (1 = off), got {value}")
    return min(max(r, 1 / PENALTY_LIMIT), PENALTY_LIMIT)


def _seed(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError("seed", f"expected a whole number, got {value!r}")
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ParamError("seed", f"must fit in 64 bits ({low}..{high}), got {value}")
    return value


def sample_seed(seed: int | None, k: int) -> int | None:
    """The seed of sample k of a request seeded with `seed` (samples differ, each reproducible)."""
    if seed is None:
        return None
    low, high = SEED_RANGE
    return (seed + k - low) % (high - low + 1) + low
