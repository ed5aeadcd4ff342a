"""`toolbox generate`: stream continuations, or run a JSONL batch file through the backend."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import click

from toolbox.backend import GenerationParams
from toolbox.commands.options import (
    backend_options,
    errors_option,
    load_options,
    model_options,
    stdin_bytes,
    stdout_bytes,
)
from toolbox.errors import ToolboxError
from toolbox.prompts import chat_prompt
from toolbox.textio import iter_line_batches, read_whole


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


def build_params(loaded, n=1, **opts) -> GenerationParams:
    """Generation settings: the options given, else the model's registry defaults."""
    d = loaded.defaults

    def pick(name, default):
        return default if opts.get(name) is None else opts[name]

    temperature = 0.0 if opts.get("greedy") else pick("temperature", d.temperature if d.do_sample else 0.0)
    max_new = pick("max_new_tokens", d.max_new_tokens)
    return GenerationParams(
        max_new_tokens=max_new,
        min_new_tokens=min(pick("min_new_tokens", d.min_new_tokens), max_new),
        temperature=temperature,
        top_p=pick("top_p", d.top_p),
        top_k=pick("top_k", d.top_k),
        repetition_penalty=pick("repetition_penalty", d.repetition_penalty),
        seed=opts.get("seed"),
        stop=tuple(opts.get("stop") or ()),
        n=n,
    )


prompt_format_option = click.option(
    "--prompt-format",
    type=click.Choice(["auto", "plain", "rinna-chat"]),
    default="auto",
    show_default=True,
    help="auto: the registry's format for the model (plain for local directories).",
)


@dataclass
class Prompter:
    """Turns user text into prompt ids for one loaded model (template, <NL>, context check)."""

    loaded: object
    params: GenerationParams
    prompt_format: str = "auto"
    truncate: str = "none"

    @property
    def nl(self) -> bool:
        """Whether the instruction template (and so the <NL> convention) applies."""
        if self.prompt_format == "auto":
            return self.loaded.chat_template
        return self.prompt_format == "rinna-chat"

    def ids(self, text: str, where: str) -> list[int]:
        if not text:
            raise ToolboxError(f"{where}: empty prompt")
        model_text = chat_prompt([("user", text)]) if self.nl else text
        ids = self.loaded.model.tokenizer.encode(model_text)
        room = self.loaded.model.context_length - self.params.max_new_tokens
        if len(ids) > room:
            if self.truncate != "left" or room < 1:
                raise ToolboxError(
                    f"{where}: prompt of {len(ids)} tokens + max_new_tokens {self.params.max_new_tokens} exceeds "
                    f"the model's context of {self.loaded.model.context_length} "
                    "(use --truncate left or a smaller --max-new-tokens)"
                )
            ids = ids[-room:]
        return ids


@click.command()
@click.argument("prompt", required=False)
@click.option("--whole", is_flag=True, help="Treat all of stdin as one prompt (default: each line is a prompt).")
@click.option("--input", "input_path", type=click.Path(dir_okay=False), help="Batch mode: a JSONL file of prompts.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False), help="Batch mode: JSONL results (resumable).")
@click.option("--field", default="prompt", show_default=True, help="Batch mode: the prompt's field in each record.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Batch mode: prompts per batch.")
@sampling_options
@click.option("-n", "n", type=click.IntRange(1, 64), default=1, show_default=True, help="Samples per prompt.")
@click.option("--truncate", type=click.Choice(["none", "left"]), default="none", show_default=True,
              help="A prompt too long for the context: error, or drop its oldest tokens.")
@prompt_format_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sequence: text, ids, logprobs, timings.")
@errors_option
@backend_options
@model_options
def generate(prompt, whole, input_path, output_path, field, batch_size, n, truncate, prompt_format, as_json, errors,
             backend, device, dtype, threads, model, revision, **sampling):
    """Generate a continuation of PROMPT, or of each line of stdin, streaming the text.

    Defaults (max new tokens, temperature, repetition penalty) come from the model's
    registry entry. For the instruction variants the prompt is wrapped in their
    template (`ユーザー: ...<NL>システム: `) and `<NL>` in the answer becomes a newline;
    --prompt-format overrides the registry (e.g. for a local copy of an instruction model).

    With --input/--output, prompts are read from a JSONL file (field --field) and run
    in batches; rerunning skips records already in the output.

    \b
    Examples:
      toolbox generate "吾輩は猫である。"
      toolbox generate --model sft "日本の首都はどこですか？"
      toolbox generate --input prompts.jsonl --output out.jsonl --greedy
    """
    if (input_path is None) != (output_path is None):
        raise click.UsageError("--input and --output go together")
    from toolbox.loader import load

    loaded = load(model, revision, backend, load_options(device, dtype, threads))
    params = build_params(loaded, n=n, **sampling)
    prompter = Prompter(loaded, params, prompt_format, truncate)
    try:
        if input_path:
            from toolbox.commands.batch import run_batch

            run_batch(prompter, input_path, output_path, field, batch_size)
        elif prompt is not None:
            _run(prompter, prompt, prompter.ids(prompt, "prompt"), 0, as_json)
        elif whole:
            text = read_whole(stdin_bytes(), errors)
            _run(prompter, text, prompter.ids(text, "stdin"), 0, as_json)
        else:
            for batch in iter_line_batches(stdin_bytes(), errors):
                for lineno, line in batch:
                    if line.strip():
                        _run(prompter, line, prompter.ids(line, f"stdin line {lineno}"), lineno - 1, as_json)
    except KeyboardInterrupt:
        stdout_bytes().write(b"\n")
        stdout_bytes().flush()
        click.echo("interrupted", err=True)
        sys.exit(130)


@dataclass
class Sequence:
    """One generated sequence as it accumulates."""

    text: str = ""
    token_ids: list = None
    logprobs: list = None
    finish_reason: str | None = None
    first_token_at: float | None = None
    done_at: float | None = None

    def __post_init__(self):
        self.token_ids, self.logprobs = [], []

    def add(self, event) -> None:
        now = time.perf_counter()
        self.first_token_at = self.first_token_at or now
        self.text += event.text
        self.token_ids.append(event.token_id)
        self.logprobs.append(event.logprob)
        if event.finish_reason:
            self.finish_reason, self.done_at = event.finish_reason, now


def _run(prompter: Prompter, text: str, ids: list[int], index: int, as_json: bool) -> None:
    """Generate for one prompt: stream text (n = 1) or print each sample when done."""
    params = prompter.params
    out = stdout_bytes()
    seqs = [Sequence() for _ in range(params.n)]
    started = time.perf_counter()
    live = not as_json and params.n == 1
    for event in prompter.loaded.model.generate([ids], params, nl=prompter.nl):
        seqs[event.seq].add(event)
        if live and event.text:
            out.write(event.text.encode("utf-8"))
            out.flush()
    for k, seq in enumerate(seqs):
        if as_json:
            record = sequence_record(seq, started, prompt=text, prompt_tokens=len(ids))
            record = {"prompt_index": index, "sample": k, **record}
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        elif live:
            out.write(b"\n")
        else:
            out.write(f"--- sample {k + 1}/{params.n} ---\n{seq.text}\n".encode("utf-8"))
    out.flush()


def sequence_record(seq: Sequence, started: float, **fields) -> dict:
    """The JSON fields of one finished sequence, timings included."""
    decode_s = (seq.done_at or started) - (seq.first_token_at or started)
    total_s = (seq.done_at or started) - started
    return {
        **fields,
        "text": seq.text,
        "token_ids": seq.token_ids,
        "logprobs": [round(lp, 6) for lp in seq.logprobs],
        "finish_reason": seq.finish_reason,
        "completion_tokens": len(seq.token_ids),
        "timings": {
            "time_to_first_token_s": round((seq.first_token_at or started) - started, 6),
            "total_s": round(total_s, 6),
            "tokens_per_s": round(len(seq.token_ids) / total_s, 2) if total_s > 0 else None,
            "decode_tokens_per_s": round((len(seq.token_ids) - 1) / decode_s, 2) if decode_s > 0 else None,
        },
    }
