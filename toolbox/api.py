"""The Python library: `load` a model, then generate, chat, score and compare with it.

    >>> import toolbox
    >>> model = toolbox.load()                       # the embedded model, on the best backend here
    >>> model.generate("吾輩は猫である。", max_new_tokens=16, seed=1).text

Everything the CLI and the server do goes through here: the registry's per-variant
defaults (`toolbox.params`), the instruction template and the `<NL>` convention
(`toolbox.prompts`), fitting into the context (`toolbox.context`), result collection
(`toolbox.results`) and scoring (`toolbox.scoring`). docs/python-api.md is the guide.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace

from toolbox.backend import LoadedModel
from toolbox.checkpoints import ModelRef, checkpoint_dir, parse_model, prompt_format, tokenizer_file
from toolbox.context import LIBRARY_ADVICE, fit_prompt, fit_turns
from toolbox.errors import ToolboxError
from toolbox.params import Settings, generation_params, sample_seed
from toolbox.prompts import chat_prompt, message_turns, to_model_text, with_instructions
from toolbox.registry import GenerationDefaults, ModelSpec
from toolbox.results import Completion, Sample
from toolbox.scoring import (
    Accumulator,
    Comparison,
    DiffAccumulator,
    Scores,
    TextScore,
    check_window,
    default_stride,
    score_documents,
    text_stats,
)
from toolbox.streaming import TextAssembler
from toolbox.tokenizer import Tokenizer
from toolbox.types import Event, GenerationParams, LoadOptions, SequenceRequest

TEMPLATES = ("auto", "plain", "rinna-chat")
#: what a fine-tuned head cannot do (it has no language-model output)
_LANGUAGE_MODEL = {"generate", "stream", "chat", "chat_ids", "events", "run", "score", "compare", "loglikelihood",
                   "loglikelihood_rolling", "params", "prompt_ids"}
PREFIXES = (None, "bos", "eos")
WORKLOADS = ("short", "generate", "score")


def load(model: str | None = None, backend: str = "auto", dtype: str | None = None, device: str | None = None,
         threads: int | None = None, revision: str | None = None, options: dict | None = None,
         workload: str = "short") -> Model:
    """Load a model: a registry id or alias ("sft", "3.6b"), a hub id, or a local checkpoint directory.

    The embedded model by default. `backend`: "auto" (cuda when available, else cpu), "cpu",
    "cuda", "quant" or a plugin's. `options` are the backend's own settings (see `toolbox
    backends`), e.g. ``{"compile": True}`` for cpu. `workload` says what follows: "short",
    "generate" (a long run of generation: a backend may spend seconds at load, compiling,
    that the run earns back) or "score" (a long run of scoring: the same for its kernel).
    Raises `ToolboxError` on any bad input.
    """
    from toolbox.backends import pick
    from toolbox.heads import head_task

    ref = parse_model(model, revision)
    check_threads(threads)
    if workload not in WORKLOADS:
        raise ToolboxError(f"workload: expected one of {', '.join(WORKLOADS)}, got {workload!r}")
    directory = checkpoint_dir(ref)
    if head_task(directory) is not None:  # a fine-tuned classifier or tagger (`toolbox finetune`)
        return _load_head(ref, backend, dtype, device, threads, options)
    chosen = pick(backend)
    extra = dict(options or {})
    chosen.check_options(extra)
    options = LoadOptions(device=device, dtype=dtype, threads=threads, extra=extra, workload=workload)
    return Model(ref, chosen.load(directory, options), chosen.name)


def _load_head(ref: ModelRef, backend: str, dtype, device, threads, options) -> Model:
    """A classification or tagging checkpoint: the built-in runtime with its head, on the CPU or a GPU."""
    from toolbox import heads

    if backend not in ("auto", "cpu", "cuda"):
        raise ToolboxError(f"backend {backend!r}: fine-tuned classification and tagging models run on cpu or cuda")
    if options:
        raise ToolboxError(f"option {next(iter(options))!r}: fine-tuned heads take no backend options")
    device = device or ("cpu" if backend == "cpu" else None)
    runner = heads.load(str(ref.local_dir or ref.repo_id), device=device, dtype=dtype, threads=threads,
                        revision=ref.revision)
    return HeadModel(ref, runner, "cuda" if str(runner.module.device).startswith("cuda") else "cpu")


def tokenizer(model: str | None = None, revision: str | None = None) -> Tokenizer:
    """The model's sentencepiece tokenizer, without loading the model (and without torch)."""
    return Tokenizer(tokenizer_file(parse_model(model, revision)))


def check_threads(threads: int | None) -> None:
    """A thread count the machine can use: 1..the number of CPUs (more only oversubscribes them)."""
    if threads is None:
        return
    cpus = os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
        raise ToolboxError(f"threads: expected 1..{cpus} (the CPUs of this machine), got {threads!r}")


class Model:
    """A loaded model: what `toolbox.load` returns.

    `loaded` is the backend's `LoadedModel` (token level); the methods here work on text,
    with the registry's defaults for the variant and its prompt template.
    """

    def __init__(self, ref: ModelRef, loaded: LoadedModel | None, backend: str):
        self.ref, self.loaded, self.backend = ref, loaded, backend
        self.head = None  # a fine-tuned classifier or tagger (`toolbox.heads.HeadRunner`); then no `loaded`

    def __repr__(self) -> str:
        kind = f" ({self.head.task})" if self.head is not None else ""
        return f"<toolbox.Model {self.name!r}{kind} on {self.backend}>"

    # -- fine-tuned heads -----------------------------------------------------------

    @property
    def task(self) -> str:
        """"generate" for a language model; "classify" or "tag" for a fine-tuned head."""
        return self.head.task if self.head is not None else "generate"

    def classify(self, texts: str | Sequence[str]):
        """Each text's label with its probability (`toolbox.heads.Classification`; a list for a list),
        for a model made by `toolbox finetune classify`."""
        from toolbox import heads

        return heads.classify(self._head("classify"), texts)

    def tag(self, texts: str | Sequence[str]):
        """Each text's entities as character spans (`toolbox.heads.Tagging`; a list for a list), for
        a model made by `toolbox finetune tag`."""
        from toolbox import heads

        return heads.tag(self._head("tag"), texts)

    def _head(self, task: str):
        if self.head is None:
            raise ToolboxError(f"{self.name} is a language model; {task} needs a model made by "
                               f"`toolbox finetune {task}`")
        return self.head

    # -- facts ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The registry id, hub id or directory the model was loaded as."""
        return self.ref.name

    @property
    def spec(self) -> ModelSpec | None:
        """The registry entry (None for a directory or hub id outside the registry)."""
        return self.ref.spec

    @property
    def tokenizer(self) -> Tokenizer:
        return (self.head or self.loaded).tokenizer

    @property
    def context_length(self) -> int:
        return (self.head or self.loaded).context_length

    @property
    def defaults(self) -> GenerationDefaults:
        """Generation defaults: the registry's for the variant, else generic ones."""
        return self.spec.defaults if self.spec else GenerationDefaults()

    @property
    def chat_template(self) -> bool:
        """Whether text prompts go through the instruction variants' template by default (the registry's
        format, or a fine-tuned checkpoint's own, from its config.json)."""
        return prompt_format(self.ref) == "rinna-chat"

    def describe(self) -> dict:
        """Backend facts: device, dtype, parameters, memory."""
        if self.head is not None:
            return {"task": self.head.task, "labels": list(self.head.labels), "device": str(self.head.module.device)}
        return self.loaded.describe()

    def close(self) -> None:
        """Release what the backend holds outside this process (a model process, ...)."""
        close = getattr(self.loaded, "close", None)
        if close is not None:
            close()

    # -- tokens ---------------------------------------------------------------------

    def tokenize(self, text: str, *, bos: bool = False, eos: bool = False, nl: bool = False) -> list[int]:
        """Token ids of `text` (sentencepiece; `nl`: newlines become `<NL>` first)."""
        return self.tokenizer.encode(to_model_text(text) if nl else text, bos=bos, eos=eos)

    def detokenize(self, ids: Sequence[int], *, nl: bool = False) -> str:
        """Text of token ids (`nl`: `<NL>` becomes a newline)."""
        try:
            text = self.tokenizer.decode(list(ids))
        except ValueError as exc:
            raise ToolboxError(str(exc)) from None
        return text.replace("<NL>", "\n") if nl else text

    # -- generation -----------------------------------------------------------------

    def params(self, policy: str = "toolbox", **settings) -> GenerationParams:
        """The `GenerationParams` that settings mean for this model (unset ones: the registry's)."""
        try:
            return generation_params(Settings(**settings), self.defaults, policy)
        except TypeError as exc:
            raise ToolboxError(f"unknown generation setting ({exc})") from None

    def uses_template(self, template: str = "auto") -> bool:
        """Whether `template` means the instruction template (and its `<NL>` convention) here."""
        if template not in TEMPLATES:
            raise ToolboxError(f"template: expected one of {', '.join(TEMPLATES)}, got {template!r}")
        return self.chat_template if template == "auto" else template == "rinna-chat"

    def prompt_ids(self, prompt: str | Sequence[int], max_new_tokens: int, template: str = "auto",
                   truncate: str = "error", where: str = "prompt", advice: str = LIBRARY_ADVICE,
                   max_field: str = "max_new_tokens") -> list[int]:
        """The ids the model sees for `prompt` (template applied to text), fitted to the context."""
        if isinstance(prompt, str):
            text = chat_prompt([("user", prompt)]) if prompt and self.uses_template(template) else prompt
            ids = self.tokenizer.encode(text)
        else:
            ids = list(prompt)
            try:
                self.tokenizer.check_ids(ids)
            except ValueError as exc:
                raise ToolboxError(f"{where}: {exc}") from None
        return fit_prompt(ids, max_new_tokens, self.context_length, truncate, where, max_field, advice)

    def generate(self, prompt: str | Sequence[int] | Sequence[str], *, template: str = "auto",
                 truncate: str = "error", batch_size: int = 16, **settings) -> Completion | list[Completion]:
        """Generate for one prompt (a `Completion`) or a list of prompts (a list of them).

        A prompt is text (the instruction template is applied for the sft/ppo variants,
        `template` overrides) or a list of token ids (used as is). Settings: max_new_tokens,
        min_new_tokens, temperature (0 = greedy), top_p, top_k, repetition_penalty, greedy,
        seed, stop (strings), n (samples per prompt); unset ones take the registry's values.
        A prompt's result depends only on the prompt and the seed (sample k uses seed + k),
        not on the batch it ran in; lists run through the backend's batcher, `batch_size`
        sequences at a time.
        """
        single = isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt
                                             and all(isinstance(t, int) for t in prompt))
        prompts = [prompt] if single else list(prompt)
        params = self.params(**settings)
        nl = self.uses_template(template)
        ids = [self.prompt_ids(p, params.max_new_tokens, template, truncate, "prompt" if single else f"prompt[{i}]")
               for i, p in enumerate(prompts)]
        completions = self.run(ids, params, nl, batch_size=batch_size,
                               texts=[p if isinstance(p, str) else None for p in prompts])
        return completions[0] if single else completions

    def stream(self, prompt: str | Sequence[int], *, template: str = "auto", truncate: str = "error",
               **settings) -> Iterator[str]:
        """Generate for one prompt, yielding text deltas as they become final (n must be 1)."""
        params = self.params(**settings)
        if params.n != 1:
            raise ToolboxError("n: stream yields one sequence; use generate for several samples")
        ids = self.prompt_ids(prompt, params.max_new_tokens, template, truncate)
        for event in self.events([ids], params, self.uses_template(template)):
            if event.text:
                yield event.text

    def chat(self, messages: Iterable, **settings) -> Completion:
        """The assistant's reply to a conversation (system/user/assistant messages, the series' template).

        The oldest turns are dropped when the conversation outgrows the context.
        """
        params = self.params(**settings)
        ids, _ = self.chat_ids(messages, params.max_new_tokens)
        return self.run([ids], params, nl=True)[0]

    def chat_ids(self, messages: Iterable, max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt ids of a conversation fitted to the context, and how many old turns were dropped."""
        instructions, turns = message_turns(messages)
        room = self.context_length - max_new_tokens
        if room < 1:
            raise ToolboxError(f"max_new_tokens: {max_new_tokens} new tokens leave no room for a prompt in the "
                               f"model's context of {self.context_length} tokens")
        # old turns go first; the instructions stay, in front of whichever user message is first then
        return fit_turns(lambda t: self.tokenizer.encode(chat_prompt(with_instructions(instructions, t))), turns, room)

    def events(self, prompts: list[list[int]], params: GenerationParams, nl: bool = False) -> Iterator[Event]:
        """Token-level streaming for prompts given as ids: `Event`s with text deltas (the backend's
        own batched `generate`, one random generator for the whole call)."""
        yield from self.loaded.generate(prompts, params, nl)

    def run(self, prompts: list[list[int]], params: GenerationParams, nl: bool = False, batch_size: int = 16,
            texts: list[str | None] | None = None, on_sample: Callable[[int, int, Sample], None] | None = None,
            errors: str = "raise") -> list[Completion]:
        """Generate for prompts given as ids: one `Completion` per prompt.

        One prompt with n = 1 runs through the backend's `generate` (its fastest path for a
        single sequence); anything more through its batcher, each sample its own request
        seeded with seed + k, so that results do not depend on batching. `on_sample(prompt,
        k, sample)` is called as each sample finishes. A sample the backend fails on its own
        raises `ToolboxError`, or with ``errors="record"`` ends with finish_reason "error" and
        its `error` set while the others go on.
        """
        texts = texts or [None] * len(prompts)
        completions = [Completion(t, ids, [Sample() for _ in range(params.n)]) for t, ids in zip(texts, prompts)]
        if len(prompts) == 1 and params.n == 1:
            sample = completions[0].samples[0]
            for event in self.events(prompts, params, nl):
                sample.add(event.token_id, event.logprob, event.text, event.finish_reason)
            if on_sample is not None:
                on_sample(0, 0, sample)
            return completions
        requests = []
        for i, ids in enumerate(prompts):
            for k in range(params.n):
                request_params = replace(params, n=1, stop=(), seed=sample_seed(params.seed, k))
                requests.append((SequenceRequest(len(requests), ids, request_params), completions[i].samples[k], i, k))
        self._drive(requests, params.stop, nl, batch_size, on_sample, errors)
        return completions

    def _drive(self, requests, stop: tuple[str, ...], nl: bool, capacity: int, on_sample, errors: str) -> None:
        """Run requests through the backend's batcher to the end (the library's engine loop)."""
        batcher = self.loaded.batcher(max(1, min(capacity, len(requests))))
        live = {}
        for request, sample, i, k in requests:
            try:
                batcher.add(request)
            except ValueError as exc:
                raise ToolboxError(f"prompt[{i}]: {exc}") from None
            live[request.id] = (TextAssembler(self.tokenizer.token_bytes, stop, nl), sample, i, k)
        while live and batcher.pending():
            for event in batcher.step():
                text, sample, i, k = live[event.seq]
                delta, reason = text.step(event.token_id, event.finish_reason)
                sample.add(event.token_id, event.logprob, delta, reason)
                if text.stopped:
                    batcher.cancel(event.seq)
                if reason is not None:
                    del live[event.seq]
                    if on_sample is not None:
                        on_sample(i, k, sample)
            for request_id, exc in getattr(batcher, "take_refused", list)():
                _, sample, i, k = live.pop(request_id)
                if errors != "record":
                    raise ToolboxError(f"prompt[{i}]: generation failed: {exc}")
                sample.finish_reason, sample.error = "error", str(exc)
                if on_sample is not None:
                    on_sample(i, k, sample)
        if live:
            raise ToolboxError("the backend's batcher ended sequences without finishing them")

    # -- scoring --------------------------------------------------------------------

    def score(self, texts: str | Sequence[str], *, window: int | None = None, stride: int | None = None,
              prefix: str | None = None, nl: bool = False,
              progress: Callable[[int, float], None] | None = None) -> Scores:
        """Log-likelihood of each text's tokens given the ones before it, with perplexities.

        `window` (default: the context) and `stride` (default: window // 2) set the sliding
        window for long texts: every token is scored once, with at least window - stride
        tokens of context (docs/score.md). `prefix` ("bos"/"eos") puts that token before each
        text, so its first token is scored too. `progress(text_index, fraction)` reports work.
        """
        return self._score_with([self], texts, window, stride, prefix, nl, progress)[0]

    def compare(self, other: Model, texts: str | Sequence[str], *, window: int | None = None,
                stride: int | None = None, prefix: str | None = None, nl: bool = False,
                progress: Callable[[int, float], None] | None = None) -> Comparison:
        """Score the same tokens with this model and `other` (same tokenizer): both scores and
        the mean and largest |Δ logprob| (e.g. a quantized backend against full precision)."""
        if other.tokenizer.sp.serialized_model_proto() != self.tokenizer.sp.serialized_model_proto():
            raise ToolboxError(f"compare: {other.name} uses another tokenizer, so its scores are not comparable")
        a, b = self._score_with([self, other], texts, window, stride, prefix, nl, progress)
        diff, per_text = DiffAccumulator(), []
        for ta, tb in zip(a.texts, b.texts):
            one = DiffAccumulator()
            one.add(ta.logprobs, tb.logprobs)
            diff.add(ta.logprobs, tb.logprobs)
            per_text.append(one.mean)
        return Comparison(a, b, diff.mean, diff.largest, per_text)

    def scoring_plan(self, window: int | None, stride: int | None, prefix: str | None,
                     context: int | None = None) -> tuple[int, int, int | None]:
        """Checked (window, stride, prefix token id) for scoring; errors name the setting."""
        context = context or self.context_length
        if window is None:
            window = context
        elif window > context:
            raise ToolboxError(f"window: {window} exceeds the model's context of {context}")
        stride = default_stride(window) if stride is None else stride
        try:
            check_window(window, stride)
        except ValueError as exc:
            raise ToolboxError(f"{'window' if window < 2 else 'stride'}: {exc}") from None
        if prefix not in PREFIXES:
            raise ToolboxError(f"prefix: expected bos, eos or None, got {prefix!r}")
        prefix_id = None
        if prefix is not None:
            if prefix not in self.tokenizer.special_ids:
                raise ToolboxError(f"prefix: the tokenizer {self.tokenizer.path} defines no {prefix} token")
            prefix_id = self.tokenizer.special_ids[prefix]
        return window, stride, prefix_id

    def _score_with(self, models: list[Model], texts, window, stride, prefix, nl, progress) -> list[Scores]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        context = min(m.context_length for m in models)
        window, stride, prefix_id = self.scoring_plan(window, stride, prefix, context)
        docs = [self.tokenize(t, nl=nl) for t in texts]
        offset = 0 if prefix_id is not None else 1
        out = []
        for m in models:
            found = score_documents(m.loaded, docs, window, stride, prefix_id, progress=progress)
            corpus = Accumulator()
            scored = []
            for text, ids, s in zip(texts, docs, found):
                corpus.add(s.logprobs)
                scored.append(TextScore(text, ids, s.logprobs, s.ranks, offset, text_stats(s.logprobs)))
            out.append(Scores(scored, corpus.stats(), window, stride, prefix))
        return out

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> list[tuple[float, bool]]:
        """For each (context, continuation): the continuation's total log-probability given the
        context, and whether greedy decoding would have produced it (every token ranked first).

        Tokens are split as lm-evaluation-harness splits them (`toolbox.likelihood`): the
        continuation is what follows as many ids of the whole text as the context alone has;
        whitespace ending a context moves to the continuation; an empty context is the start
        token (BOS, else EOS). A sequence longer than the context keeps its newest tokens.
        """
        from toolbox import likelihood

        start = likelihood.start_token(self)
        split = [likelihood.split(self.tokenizer.encode, c, x, start) for c, x in pairs]
        return likelihood.score(self, split, self.context_length, batch_size,
                                [f"pairs[{i}]" for i in range(len(split))])

    def loglikelihood_rolling(self, texts: Sequence[str], window: int | None = None) -> list[float]:
        """Each text's total log-likelihood with every token scored, the first given the start token
        (BOS, else EOS); long texts in windows of the context, each new token with the most context."""
        window = window or self.context_length
        start = "bos" if "bos" in self.tokenizer.special_ids else "eos"
        scores = self.score(list(texts), window=window, stride=window - 1, prefix=start)
        return [t.stats.logprob for t in scores.texts]


class HeadModel(Model):
    """A fine-tuned classifier or tagger (`toolbox finetune classify|tag`): `classify` or `tag`,
    `tokenize`, `detokenize`; it has no language-model output, so generating or scoring with it
    is a one-line error saying what to use instead."""

    def __init__(self, ref: ModelRef, runner, backend: str):
        super().__init__(ref, None, backend)
        self.head = runner


def _not_a_language_model(name: str):
    def refuse(self, *args, **kwargs):
        raise ToolboxError(f"{self.name} is a {self.head.task} model, not a language model: use "
                           f"Model.{self.head.task} (toolbox {self.head.task}) with it")

    refuse.__name__ = name
    return refuse


for _name in _LANGUAGE_MODEL:
    setattr(HeadModel, _name, _not_a_language_model(_name))
