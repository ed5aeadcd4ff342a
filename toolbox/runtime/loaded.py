"""`RuntimeModel`: the shared GPT-NeoX runtime behind the LoadedModel interface.

The built-in backends differ only in how they prepare the module (device, dtype,
quantization); generation and scoring go through this one class.
"""

from __future__ import annotations

from pathlib import Path

import torch

from toolbox.backend import GenerationParams, LoadedModel, TokenEvent, TokenScores
from toolbox.errors import ToolboxError
from toolbox.runtime.generation import Generation, score
from toolbox.runtime.model import GPTNeoX
from toolbox.runtime.sampling import SamplingParams
from toolbox.tokenizer import Tokenizer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def torch_dtype(name: str, allowed: tuple[str, ...]) -> torch.dtype:
    """The torch dtype for a --dtype value, restricted to what a backend supports."""
    dtype = DTYPES.get(name)
    if dtype is None or not any(DTYPES.get(a) is dtype for a in allowed):
        raise ToolboxError(f"dtype {name!r} is not supported here; choose one of: {', '.join(allowed)}")
    return dtype


def load_module(checkpoint: Path, device: str, dtype: torch.dtype) -> GPTNeoX:
    """Load the checkpoint's weights into the runtime module, with a one-line error on bad files
    (a corrupt or truncated safetensors header, a garbage .bin, shapes that disagree with config.json)."""
    try:
        return GPTNeoX.from_pretrained(checkpoint, device=device, dtype=dtype)
    except ToolboxError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and torch each raise their own kinds
        raise ToolboxError(f"cannot load {checkpoint}: {weight_error(exc)}") from None


def weight_error(exc: Exception) -> str:
    """One line saying what was wrong with a weight file."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    kind = type(exc).__name__
    if kind not in ("ValueError", "KeyError", "FileNotFoundError", "OSError") and not text.startswith(kind):
        text = f"{kind}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


class _Stream:
    """Adapts the runtime's `Generation` to the `TokenStream` protocol."""

    def __init__(self, generation: Generation):
        self._generation = generation

    def __iter__(self):
        for step in self._generation:
            yield [TokenEvent(t.seq, t.token_id, t.logprob, t.finish_reason, t.top) for t in step.tokens]

    def cancel(self, seq: int) -> None:
        self._generation.cancel(seq)


class RuntimeModel(LoadedModel):
    """A `GPTNeoX` module plus its tokenizer."""

    def __init__(self, module: GPTNeoX, tokenizer: Tokenizer, info: dict, decode_fn=None, batch_decode_fn=None,
                 score_kernel=None):
        self.module = module
        self.tokenizer = tokenizer
        self.context_length = module.config.max_position_embeddings
        self.info = info
        self._decode_fn = decode_fn
        self._batch_decode_fn = batch_decode_fn  # the continuous batcher's (with an explicit cache)
        self._score_kernel = score_kernel  # `toolbox.runtime.score_kernel.ScoreKernel`, or None: eager
        eos = set(module.config.eos_token_ids)
        if "eos" in tokenizer.special_ids:
            eos.add(tokenizer.special_ids["eos"])
        self.eos_token_ids = tuple(sorted(eos))
        vocab = module.config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise ToolboxError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} ids but the model's "
                               f"vocabulary only {vocab} (config.json vocab_size): they do not belong together")
        # a vocabulary padded past the tokenizer's (to a multiple of 64, ...): those ids are never sampled
        self.sampled_vocab = tokenizer.vocab_size if tokenizer.vocab_size < vocab else None

    def generate_tokens(self, prompts, params: GenerationParams):
        try:
            sampling = SamplingParams(
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                repetition_penalty=params.repetition_penalty,
                seed=params.seed,
            )
            generation = Generation(
                self.module,
                prompts,
                max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.min_new_tokens,
                sampling=sampling,
                eos_token_ids=self.eos_token_ids,
                n=params.n,
                decode_fn=self._decode_fn,
                sampled_vocab=self.sampled_vocab,
                top_logprobs=params.top_logprobs,
            )
        except ValueError as exc:
            raise ToolboxError(str(exc)) from None
        return _Stream(generation)

    def score(self, sequences):
        return self.score_from(sequences, [1] * len(sequences))

    def score_from(self, sequences, first):
        """Scores of tokens first[i]..len-1; the output layer runs for those positions only."""
        return self.score_top(sequences, first, 0)

    def score_top(self, sequences, first, k):
        try:
            found = score(self.module, sequences, first=first, top=k, kernel=self._score_kernel)
        except ValueError as exc:
            raise ToolboxError(str(exc)) from None
        out = []
        for s in found:
            top = None
            if k:
                top = [list(zip(ids, lps)) for ids, lps in zip(s.top_ids.tolist(), s.top_logprobs.tolist())]
            out.append(TokenScores(s.logprobs.tolist(), s.ranks.tolist(), top))
        return out

    def batcher(self, capacity: int):
        """Continuous batching: a request joins the running batch at the next step."""
        from toolbox.runtime.batcher import ContinuousBatcher

        return ContinuousBatcher(self.module, self.eos_token_ids, capacity, sampled_vocab=self.sampled_vocab,
                                 decode_fn=self._batch_decode_fn)

    def describe(self) -> dict:
        params = sum(p.numel() for p in self.module.parameters())
        return {**self.info, "parameters": params, "weight_bytes": weight_bytes(self.module)}


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's state: tied tensors once, quantized and packed weights included
    (tensor subclasses such as torchao's are sized through their inner tensors)."""
    seen: set[int] = set()

    def size(value) -> int:
        if isinstance(value, (tuple, list)):
            return sum(size(v) for v in value)
        if not isinstance(value, torch.Tensor):
            return 0
        if type(value) not in (torch.Tensor, torch.nn.Parameter) and hasattr(value, "__tensor_flatten__"):
            names, _ = value.__tensor_flatten__()
            return sum(size(getattr(value, n)) for n in names)
        if value.is_quantized or value.layout != torch.strided:
            return value.numel() * value.element_size()
        key = value.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()

    return sum(size(v) for v in module.state_dict().values())


def checkpoint_tokenizer(checkpoint: Path) -> Tokenizer:
    return Tokenizer(checkpoint / "spiece.model")
