"""`toolbox generate`: stream continuations, or run a JSONL batch file through the backend."""

from __future__ import annotations

import json
import sys

import click

from toolbox.batchjob import sample_fields
from toolbox.commands.options import (
    CLI_ADVICE,
    build_params,
    errors_option,
    model_load_options,
    sampling_options,
    stdin_bytes,
    stdout_bytes,
)
from toolbox.textio import iter_line_batches, read_whole

prompt_format_option = click.option(
    "--prompt-format",
    type=click.Choice(["auto", "plain", "rinna-chat"]),
    default="auto",
    show_default=True,
    help="auto: the registry's format for the model, or a fine-tuned directory's own (else plain).",
)


@click.command()
@click.argument("prompt", required=False)
@click.option("--whole", is_flag=True, help="Treat all of stdin as one prompt (default: each line is a prompt).")
@click.option("--input", "input_path", type=click.Path(), help="Batch mode: a JSONL file of prompts (--ray: also CSV, "
              "Parquet, a folder or a URI).")
@click.option("--output", "output_path", type=click.Path(), help="Batch mode: JSONL results (resumable; --ray: also a "
              "folder of JSONL or Parquet shards).")
@click.option("--field", default="prompt", show_default=True, help="Batch mode: the prompt's field in each record.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Batch mode: prompts per batch.")
@click.option("--ray", "use_ray", is_flag=True, help="Batch mode as a Ray Data job: an actor pool of models (docs/scale.md).")
@click.option("--replicas", type=click.IntRange(min=1), default=None, help="With --ray: model actors [default: 1].")
@click.option("--gpus-per-actor", type=click.FloatRange(min=0), default=None,
              help="With --ray: GPUs each actor holds [default: 1 for a model on CUDA, else 0].")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="With --ray: the cluster (host:port, ray://host:port, auto) [default: $RAY_ADDRESS, else a local one].")
@sampling_options
@click.option("-n", "n", type=click.IntRange(1, 64), default=1, show_default=True, help="Samples per prompt.")
@click.option("--truncate", type=click.Choice(["none", "left"]), default="none", show_default=True,
              help="A prompt too long for the context: error, or drop its oldest tokens.")
@prompt_format_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sequence: text, ids, logprobs, timings.")
@errors_option
@model_load_options
def generate(prompt, whole, input_path, output_path, field, batch_size, use_ray, replicas, gpus_per_actor, ray_address,
             n, truncate, prompt_format, as_json, errors, choice, **sampling):
    """Generate a continuation of PROMPT, or of each line of stdin, streaming the text.

    Defaults (max new tokens, temperature, repetition penalty) come from the model's
    registry entry. For the instruction variants the prompt is wrapped in their
    template (`ユーザー: ...<NL>システム: `) and `<NL>` in the answer becomes a newline;
    --prompt-format overrides the registry (e.g. for a local copy of an instruction model).

    With --input/--output, prompts are read from a JSONL file (field --field) and run
    in batches; rerunning skips records already in the output. A sample's text depends
    only on its prompt and the seed (sample k of a prompt uses seed + k).

    \b
    Examples:
      toolbox generate "吾輩は猫である。"
      toolbox generate --model sft "日本の首都はどこですか？"
      toolbox generate --input prompts.jsonl --output out.jsonl --greedy
    """
    if (input_path is None) != (output_path is None):
        raise click.UsageError("--input and --output go together")
    params = build_params(choice, n=n, **sampling)
    if use_ray or replicas or gpus_per_actor is not None or ray_address:
        from toolbox.ray.batch import from_cli

        return from_cli(use_ray, choice, params, input_path, output_path, field, batch_size, prompt_format, truncate,
                        replicas, gpus_per_actor, ray_address)
    job = None
    if input_path:
        from toolbox.commands.batch import BatchJob

        job = BatchJob(input_path, output_path, field, batch_size, template=prompt_format,
                       truncate="left" if truncate == "left" else "error")
        job.check()  # input readable, output writable: before the model loads
    choice.check()
    model = choice.load("generate" if job is not None else "short")
    run = Runner(model, params, prompt_format, "left" if truncate == "left" else "error", as_json)
    try:
        if job is not None:
            job.run(model, params)
        elif prompt is not None:
            run(prompt, "prompt", 0)
        elif whole:
            run(read_whole(stdin_bytes(), errors), "stdin", 0)
        else:
            for batch in iter_line_batches(stdin_bytes(), errors):
                for lineno, line in batch:
                    if line.strip():
                        run(line, f"stdin line {lineno}", lineno - 1)
    except KeyboardInterrupt:
        stdout_bytes().write(b"\n")
        stdout_bytes().flush()
        click.echo("interrupted", err=True)
        sys.exit(130)


class Runner:
    """Generates for one prompt at a time: streams the text (n = 1), or prints each sample when done."""

    def __init__(self, model, params, template: str, truncate: str, as_json: bool):
        self.model, self.params, self.template, self.truncate, self.as_json = model, params, template, truncate, as_json
        self.nl = model.uses_template(template)

    def __call__(self, text: str, where: str, index: int) -> None:
        params, out = self.params, stdout_bytes()
        ids = self.model.prompt_ids(text, params.max_new_tokens, self.template, self.truncate, where,
                                     advice=CLI_ADVICE, max_field="--max-new-tokens")
        if not self.as_json and params.n == 1:  # stream the text as it comes
            for event in self.model.events([ids], params, self.nl):
                if event.text:
                    out.write(event.text.encode("utf-8"))
                    out.flush()
            out.write(b"\n")
            out.flush()
            return
        (completion,) = self.model.run([ids], params, self.nl, texts=[text])
        for k, sample in enumerate(completion.samples):
            if self.as_json:
                record = {"prompt_index": index, "sample": k, "prompt": text, "prompt_tokens": len(ids),
                          **sample_fields(sample, completion.started)}
                out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            else:
                out.write(f"--- sample {k + 1}/{params.n} ---\n{sample.text}\n".encode())
        out.flush()
