"""toolbox-hf-example: a third-party toolbox plugin that uses all three hooks.

register_backends  the `hf` backend: transformers' GPTNeoXForCausalLM, float32, on the CPU
register_models    a registry entry for the hub id `example/gpt-neox-tiny`
register_commands  `toolbox hf-info`

toolbox imports every installed plugin at start-up, so this module imports only the
standard library, click and toolbox at the top; torch and transformers wait for `load`.
"""

from __future__ import annotations

import importlib.util
import inspect
from importlib.metadata import PackageNotFoundError, version

import click

from toolbox.backend import Backend, LoadedModel, TokenEvent, TokenScores
from toolbox.errors import ToolboxError
from toolbox.hookspecs import hookimpl
from toolbox.registry import Architecture, GenerationDefaults, ModelSpec
from toolbox.tokenizer import Tokenizer


class HFStream:
    """The TokenStream: iterating runs the decode loop, one list of TokenEvents per step.

    Prompts run one after another; the n samples of a prompt share its length, so they
    form one batch with no padding.
    """

    def __init__(self, model: HFModel, prompts, params, sampling):
        self.model, self.prompts, self.params, self.sampling = model, prompts, params, sampling
        self.cancelled: set[int] = set()

    def cancel(self, seq: int) -> None:
        self.cancelled.add(seq)  # honoured from the next step on

    def __iter__(self):
        import torch

        gen = torch.Generator()  # one generator for the whole call: a seed fixes every sample
        gen.seed() if self.params.seed is None else gen.manual_seed(self.params.seed)
        for index, prompt in enumerate(self.prompts):
            yield from self._run(index, prompt, gen)

    def _run(self, index: int, prompt: list[int], gen):
        import torch

        from toolbox.runtime.sampling import sample  # the shared filters: penalty, temperature, top-k/p

        p, n, m = self.params, self.params.n, self.model
        seqs = [index * n + k for k in range(n)]  # the numbering the text layer expects
        ids, cache, running = torch.tensor([prompt] * n), None, [True] * n
        seen = None  # tokens the repetition penalty applies to: the prompt, then each output
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(n, m.hf.config.vocab_size, dtype=torch.bool)
            seen[:, prompt] = True
        eos = torch.tensor(sorted(m.eos_ids)) if m.eos_ids else None
        for step in range(p.max_new_tokens):
            with torch.inference_mode():  # only around the work: never left on across a yield
                out = m.hf(input_ids=ids, use_cache=True, **{m.cache_arg: cache})
                cache = out[m.cache_arg]  # transformers' KV cache, passed back in on the next step
                banned = eos if step < p.min_new_tokens else None  # EOS is held off until min_new_tokens
                tokens, logprobs = sample(out.logits[:, -1], self.sampling, gen, seen, banned)
            events = []
            for k, seq in enumerate(seqs):
                running[k] = running[k] and seq not in self.cancelled
                if running[k]:
                    token = int(tokens[k])
                    reason = "stop" if token in m.eos_ids else "length" if step == p.max_new_tokens - 1 else None
                    running[k] = reason is None
                    events.append(TokenEvent(seq, token, float(logprobs[k]), reason))
            if events:
                yield events
            if not any(r and seq not in self.cancelled for r, seq in zip(running, seqs)):
                return
            ids = tokens[:, None]  # finished rows keep decoding, unseen: simpler than shrinking the cache
            if seen is not None:
                seen[torch.arange(n), tokens] = True


class HFModel(LoadedModel):
    """transformers behind the two token-level methods; `generate` (the text) comes from LoadedModel."""

    def __init__(self, hf, tokenizer: Tokenizer):
        self.hf, self.tokenizer = hf, tokenizer
        self.context_length = hf.config.max_position_embeddings
        eos = hf.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.eos_ids |= {tokenizer.special_ids["eos"]} if "eos" in tokenizer.special_ids else set()
        # The KV-cache argument (and output field) is `past_key_values` in older transformers, `cache` in newer.
        self.cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def generate_tokens(self, prompts, params):
        from toolbox.runtime.sampling import SamplingParams

        for prompt in prompts:  # check up front: mistakes become one-line errors, before any work
            if not prompt or len(prompt) + params.max_new_tokens > self.context_length:
                raise ToolboxError(f"prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} "
                                   f"does not fit the context of {self.context_length}")
        try:
            sampling = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                      repetition_penalty=params.repetition_penalty, seed=params.seed)
        except ValueError as exc:
            raise ToolboxError(str(exc)) from None
        return HFStream(self, prompts, params, sampling)

    def score(self, sequences):
        import torch

        result = []
        for seq in sequences:  # one at a time: no padding to get right
            if len(seq) > self.context_length:
                raise ToolboxError(f"sequence of {len(seq)} tokens exceeds the context of {self.context_length}")
            if len(seq) < 2:
                result.append(TokenScores([], []))
                continue
            with torch.inference_mode():
                logits = self.hf(input_ids=torch.tensor([seq])).logits[0, :-1].float()
                target = logits.gather(-1, torch.tensor(seq[1:])[:, None])
                logprobs = target[:, 0] - logits.logsumexp(-1)
                ranks = (logits > target).sum(-1) + 1  # 1 = the most likely token
            result.append(TokenScores(logprobs.tolist(), ranks.tolist()))
        return result

    def describe(self):
        return {"backend": "hf", "device": "cpu", "dtype": "float32", "transformers": transformers_version()}


class HFBackend(Backend):
    name = "hf"
    description = "Hugging Face transformers on the CPU (float32); example plugin"

    def unavailable_reason(self):
        # find_spec looks for the package without importing it, so `toolbox backends` stays fast.
        return "transformers is not installed" if importlib.util.find_spec("transformers") is None else None

    def load(self, checkpoint, options):
        import torch
        from transformers import GPTNeoXForCausalLM

        if options.device not in (None, "cpu") or options.dtype not in (None, "float32", "fp32"):
            raise ToolboxError("the hf backend runs on the CPU in float32 only")
        if options.threads:
            torch.set_num_threads(options.threads)
        try:
            hf = GPTNeoXForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        except (OSError, ValueError) as exc:
            raise ToolboxError(f"cannot load {checkpoint}: {exc}") from None
        return HFModel(hf, Tokenizer(checkpoint / "spiece.model"))


def transformers_version() -> str | None:
    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


@hookimpl
def register_backends():
    return [HFBackend()]


@hookimpl
def register_models():
    return [ModelSpec(
        id="example/gpt-neox-tiny", aliases=("hf-tiny",), role="example", prompt_format="plain",
        description="Added by the toolbox-hf-example plugin to show the register_models hook.",
        architecture=Architecture(layers=2, hidden=64, heads=4, intermediate=256, vocab=8000, context=256),
        defaults=GenerationDefaults(max_new_tokens=32, temperature=0.8),
    )]


@hookimpl
def register_commands(cli):
    @cli.command("hf-info")
    def hf_info():
        """Show the transformers version the hf backend would use."""
        found = transformers_version()
        click.echo(f"transformers {found}" if found else "transformers is not installed")
