"""lm-evaluation-harness over a toolbox model: lm-eval's own tasks, on any toolbox backend.

`ToolboxLM` is an lm-eval `TemplateLM` registered as model "toolbox": lm-eval splits each
(context, continuation) into token ids the way it does for its `hf` model (sentencepiece
ids here, through the toolbox tokenizer), and `toolbox.likelihood` scores them through
the backend's `score_from`, which computes the output layer only for the continuation. Rolling
log-likelihoods use lm-eval's own window plan; generation runs through the toolbox batcher
with lm-eval's stop sequences and context truncation. So results on a task equal lm-eval's
`hf` model on the same checkpoint, with the toolbox's speed and backends.

Imports lm_eval (and, through the model, torch): load it only for `toolbox eval harness`.
"""

from __future__ import annotations

from toolbox.errors import ToolboxError

try:
    # lm-eval fills its model registry (lazily, by name) only while the registry is empty; do that
    # first, or registering "toolbox" would hide its own models ("hf", "local-completions", ...)
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ToolboxError("toolbox eval harness needs lm-eval: pip install 'rinna-toolbox[eval]'") from None

GENERATION_KWARGS = ("top_p", "top_k", "repetition_penalty", "seed", "min_new_tokens")


@register_model("toolbox")
class ToolboxLM(TemplateLM):
    """A toolbox `Model` as an lm-eval LM. Build it from a loaded model, or let lm-eval build it
    from `model_args` ("model=sft,backend=cpu,dtype=float32,batch_size=16")."""

    def __init__(self, model=None, backend: str = "auto", dtype: str | None = None, device: str | None = None,
                 threads: int | None = None, revision: str | None = None, batch_size: int | str = 16,
                 max_length: int | None = None, **_ignored):
        from toolbox import likelihood

        super().__init__()
        if model is None or isinstance(model, str):
            import toolbox

            model = toolbox.load(model, backend=backend, dtype=dtype, device=device,
                                 threads=int(threads) if threads else None, revision=revision)
        self.model = model
        self._batch = int(batch_size) if str(batch_size).isdigit() else 16
        self._max_length = min(int(max_length), model.context_length) if max_length else model.context_length
        ids = model.tokenizer.special_ids
        if "eos" not in ids:
            raise ToolboxError(f"{model.name}: the tokenizer defines no EOS token, which lm-eval needs")
        self._eot = ids["eos"]
        self._prefix = likelihood.start_token(model)  # as lm-eval's hf model: BOS when the tokenizer has one

    # -- what TemplateLM needs ----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.tokenizer.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.model.tokenizer.encode(string)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.model.detokenize([tokens] if isinstance(tokens, int) else tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Score each (context ids, continuation ids) through the backend (toolbox.likelihood)."""
        from toolbox import likelihood

        results = likelihood.score(self.model, [(c, x) for _, c, x in requests], self.max_length, self._batch)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's rolling windows (every token scored once, the first given the prefix token)."""
        from lm_eval import utils

        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            plan = utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                   prefix_token=self.prefix_token_id,
                                                   max_seq_len=self.max_length, context_len=1)
            for window in map(utils.make_disjoint_window, plan):
                windows.append((None, *window))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless the task samples) up to lm-eval's stop sequences, the context cut from the left."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        groups: dict = {}
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), 256)
            until = tuple(handle_stop_sequences(kwargs.pop("until", None), eos=None))
            settings = {"max_new_tokens": kwargs.pop("max_gen_toks"), "stop": until,
                        "temperature": kwargs.pop("temperature", 0.0) if kwargs.pop("do_sample", False) else 0.0}
            settings.update({k: kwargs[k] for k in GENERATION_KWARGS if kwargs.get(k) is not None})
            if settings["max_new_tokens"] >= self.max_length:
                raise ToolboxError(f"lm-eval asked for {settings['max_new_tokens']} new tokens; the model's context "
                                   f"is {self.max_length}")
            key = tuple(sorted((k, v) for k, v in settings.items()))
            groups.setdefault(key, []).append((n, context))
        out: list = [None] * len(requests)
        for key, members in groups.items():
            settings = dict(key)
            params = self.model.params(**settings)
            ids = [self.model.prompt_ids(c, params.max_new_tokens, "plain", "left", f"request {n}") for n, c in members]
            completions = self.model.run(ids, params, nl=False, batch_size=self._batch)
            for (n, context), completion in zip(members, completions):
                out[n] = completion.text
                self.cache_hook.add_partial("generate_until", (context, requests[n].args[1]), completion.text)
        return out

    # -- chat templates (the instruction variants) ------------------------------------------

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "rinna-chat" if self.model.chat_template else ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from toolbox.prompts import chat_prompt, message_turns

        return chat_prompt(message_turns(chat_history))


def run_harness(model, tasks: list[str], *, num_fewshot: int | None = None, limit: float | None = None,
                include_path: str | None = None, batch_size: int = 16, seed: int = 0,
                apply_chat_template: bool = False, log_samples: bool = False) -> dict:
    """lm-eval's `simple_evaluate` with a toolbox model; unknown task names are a one-line error."""
    from pathlib import Path

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    def unknown(manager) -> list[str]:
        known = set(manager.all_tasks)
        return [t for t in tasks if t not in known and not any(ch in t for ch in "*?") and not Path(t).is_file()]

    # lm-eval's own index takes seconds to build: skip it when the local tasks are all that is asked for
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or unknown(manager):
        manager = TaskManager(include_path=include_path)
    missing = unknown(manager)
    if missing:
        raise ToolboxError(f"lm-eval task {missing[0]!r} not found (see `lm-eval ls tasks`; local task "
                           "files: --include-path DIR)")
    lm = ToolboxLM(model, batch_size=batch_size)
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed, apply_chat_template=apply_chat_template,
                           log_samples=log_samples, bootstrap_iters=1000)
