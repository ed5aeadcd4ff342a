"""Options and helpers shared by several commands."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import click

from toolbox.checkpoints import parse_model, tokenizer_file
from toolbox.errors import ToolboxError

CLI_ADVICE = "use --truncate left or a smaller --max-new-tokens"

model_option = click.option(
    "-m",
    "--model",
    envvar="TOOLBOX_MODEL",
    default=None,
    metavar="NAME|DIR",
    help="Registry id or alias, hub id, or checkpoint directory [env TOOLBOX_MODEL; default: embedded].",
)
revision_option = click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
errors_option = click.option(
    "--errors",
    type=click.Choice(["strict", "replace"]),
    default="strict",
    show_default=True,
    help="Invalid UTF-8 input: stop with an error, or replace with U+FFFD.",
)
nl_option = click.option(
    "--nl",
    is_flag=True,
    help="Instruction models' newline convention: newline in the text <-> <NL> token.",
)


def model_options(func):
    """Attach --model and --revision."""
    return model_option(revision_option(func))


def load_tokenizer(model: str | None, revision: str | None):
    """The sentencepiece tokenizer of the model named by --model."""
    from toolbox.tokenizer import Tokenizer

    return Tokenizer(tokenizer_file(checked_ref(model, revision)))


def checked_ref(model: str | None, revision: str | None):
    """`parse_model`, refusing a hub revision for a local directory (it would be silently ignored)."""
    ref = parse_model(model, revision)
    if ref.local_dir is not None and revision is not None and ref.repo_id is None:
        raise click.BadParameter(f"{model or ref.name} is a local directory; a hub revision does not apply",
                                 param_hint="--revision")
    return ref


def stdin_bytes():
    return sys.stdin.buffer


def stdin_unbuffered():
    """stdin below Python's buffer, for reading on a background thread: an exit while such a
    thread waits inside the buffered reader aborts the interpreter (it cannot take the
    reader's lock at shutdown). An in-memory stdin (click's test runner) is returned as is."""
    return getattr(sys.stdin.buffer, "raw", sys.stdin.buffer)


def stdout_bytes():
    return sys.stdout.buffer


@dataclass(frozen=True)
class ModelChoice:
    """What the model options of a command asked for; `load` it once the cheap checks passed."""

    model: str | None = None
    revision: str | None = None
    backend: str = "auto"
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    options: dict = field(default_factory=dict)

    def check(self) -> None:
        """The checks that need no loading: the model name, the backend and its options."""
        from toolbox.backends import pick

        checked_ref(self.model, self.revision)
        pick(self.backend).check_options(self.options)

    @property
    def defaults(self):
        """The registry's generation defaults for the model (known before loading it)."""
        from toolbox.registry import GenerationDefaults

        spec = parse_model(self.model, self.revision).spec
        return spec.defaults if spec else GenerationDefaults()

    def load(self, workload: str = "short"):
        """The `toolbox.Model` (a one-line error for anything wrong); `workload` as in `toolbox.load`."""
        from toolbox.api import load

        return load(self.model, self.backend, self.dtype, self.device, self.threads, self.revision, self.options,
                    workload)

    def load_options(self, workload: str = "short"):
        """The backend's `LoadOptions` for this choice (a model loaded in a process of its own)."""
        from toolbox.types import LoadOptions

        return LoadOptions(self.device, self.dtype, self.threads, self.options, workload)


def _threads(ctx, param, value):
    from toolbox.api import check_threads

    try:
        check_threads(value)
    except ToolboxError as exc:
        raise click.BadParameter(str(exc).removeprefix("threads: ")) from None
    return value


def _backend_option_values(ctx, param, values):
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def model_load_options(func):
    """Attach --model, --revision, --backend, --device, --dtype, --threads and -o/--option;
    the command receives them as one `choice` (a `ModelChoice`)."""

    @functools.wraps(func)
    def wrapper(*args, model, revision, backend, device, dtype, threads, option, **kwargs):
        return func(*args, choice=ModelChoice(model, revision, backend, device, dtype, threads, option), **kwargs)

    for opt in reversed(
        [
            click.option(
                "-b", "--backend", default="auto", show_default=True, envvar="TOOLBOX_BACKEND",
                help="Backend name (see `toolbox backends`); auto = cuda if present, else cpu.",
            ),
            click.option("--device", default=None, help="Device, e.g. cpu, cuda, cuda:1 (default: the backend's)."),
            click.option(
                "--dtype", default=None,
                help="float32/bfloat16 (cpu), float16/bfloat16 (cuda), int8/int4 (quant).",
            ),
            click.option("--threads", type=int, default=None, callback=_threads,
                         help="CPU threads (1 to the machine's CPU count)."),
            click.option("-o", "--option", multiple=True, metavar="KEY=VALUE", callback=_backend_option_values,
                         help="A backend option (repeatable); `toolbox backends` lists each backend's."),
            model_option,
            revision_option,
        ]
    ):
        wrapper = opt(wrapper)
    return wrapper


def sampling_options(func):
    """Attach the sampling and stopping options shared by generate and chat (defaults: the registry's)."""
    for option in reversed(
        [
            click.option("--max-new-tokens", type=click.IntRange(min=1), help="Tokens to generate at most."),
            click.option("--min-new-tokens", type=click.IntRange(min=0), help="Tokens to generate at least (EOS is held off)."),
            click.option("--temperature", type=click.FloatRange(min=0), help="Sampling temperature; 0 = greedy."),
            click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling mass."),
            click.option("--top-k", type=click.IntRange(min=0), help="Sample among the k most likely tokens (0 = off)."),
            click.option(
                "--repetition-penalty", type=click.FloatRange(min=0, min_open=True),
                help="Penalty (> 1 discourages) for tokens already in the prompt or output.",
            ),
            click.option("--greedy", is_flag=True, help="Greedy decoding (same as --temperature 0)."),
            click.option("--stop", multiple=True, help="Stop when this string appears (repeatable); it is cut off."),
            click.option("--seed", type=int, help="Seed for reproducible sampling."),
        ]
    ):
        func = option(func)
    return func


def build_params(choice: ModelChoice, n: int = 1, **sampling):
    """Generation settings: the options given, else the model's registry defaults (checked before
    anything loads); a bad value is reported against its option (`--temperature`, ...)."""
    from toolbox.params import ParamError, Settings, generation_params

    sampling["stop"] = tuple(sampling.get("stop") or ())
    try:
        return generation_params(Settings(n=n, **sampling), choice.defaults)
    except ParamError as exc:
        raise click.BadParameter(exc.reason, param_hint="--" + exc.setting.replace("_", "-")) from None
