"""Request and response models of the server, and its error bodies.

Request models are strict (a string is not a number, 1 is not true) and name the
offending field in every error. Unknown fields are ignored in the OpenAI requests
(clients send vendor extras) and refused in the Azure `parameters` (they would be
generation settings that silently do nothing). Every client mistake becomes
`APIError`, answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator

from toolbox.params import Settings, generation_params
from toolbox.registry import GenerationDefaults
from toolbox.types import GenerationParams

INT64 = dict(ge=-(2**63), le=2**63 - 1)


class APIError(Exception):
    """A request the server will not serve: status, message and the field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def param_path(loc) -> str:
    """A pydantic location as a field path: ("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def invalid(exc: ValidationError, prefix: tuple = ()) -> APIError:
    """The first validation error as a 400 naming its field."""
    err = exc.errors(include_url=False)[0]
    param = param_path((*prefix, *err["loc"])) or "body"
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        msg, code = "required field is missing", "missing_field"
    elif kind == "extra_forbidden":
        msg, code = "unknown field", "unknown_field"
    elif kind.endswith("_type") or kind in ("literal_error", "bool_parsing", "int_parsing", "float_parsing"):
        code = "invalid_type"
    else:
        code = "invalid_value"
    msg = msg.removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}", param=param, code=code)


def validate(model: type[BaseModel], data: Any, prefix: tuple = ()):
    """`model.model_validate(data)`, with errors as APIError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc, prefix) from None


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# -- errors -----------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error")
    param: str | None = Field(None, description="The request field at fault, e.g. `max_tokens` or `messages[1].role`.")
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- OpenAI: completions ----------------------------------------------------------


class StreamOptions(Request):
    include_usage: bool | None = Field(None, description="Send a last chunk with the usage (and no choices).")


def _stop_list(v, handler):
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    try:
        return handler(v)
    except ValidationError:
        raise ValueError("must be a string or a list of at most 16 strings") from None


class SamplingFields(Request):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, description="A name from /v1/models (optional: the served model).")
    temperature: float | None = Field(None, ge=0, le=2, description="Default 1 (OpenAI's); 0 = greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Default 1 (OpenAI's).")
    n: int | None = Field(None, ge=1, le=64, description="Choices per prompt (default 1).")
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings; the text is cut before them.")
    seed: int | None = Field(None, **INT64, description="Reproducible sampling; choice k uses seed + k.")
    stream: bool | None = Field(None, description="Stream Server-Sent Events in OpenAI's chunk format.")
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Only an empty map is supported.")
    user: str | None = None
    # extensions (as in vLLM)
    top_k: int | None = Field(None, ge=0, description="Extension: sample among the k most likely tokens (0 = off).")
    repetition_penalty: float | None = Field(
        None, gt=0, le=10, description="Extension: transformers' repetition penalty (default: the registry's)."
    )
    min_tokens: int | None = Field(
        None, ge=0, description="Extension: end-of-sequence is held off until this many tokens (default: the registry's)."
    )
    return_token_ids: bool | None = Field(None, description="Extension: add `token_ids` (and `prompt_token_ids`) to each choice.")

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, v, handler):
        out = _stop_list(v, handler)
        if out is not None and len(out) > 16:
            raise ValueError("must be a string or a list of at most 16 strings")
        return out

    #: the request's names for the library's settings, for errors
    NAMES: ClassVar[dict[str, str]] = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}

    def generation_params(self, defaults: GenerationDefaults, max_new: int, top_logprobs: int = 0) -> GenerationParams:
        """OpenAI's defaults where the API defines them (temperature 1, top_p 1), else the registry's
        (`toolbox.params`, policy "openai"); raises `ParamError`."""
        settings = Settings(max_new_tokens=max_new, min_new_tokens=self.min_tokens, temperature=self.temperature,
                            top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                            seed=self.seed, stop=tuple(self.stop or ()), top_logprobs=top_logprobs)
        return generation_params(settings, defaults, "openai")


PROMPT_ERROR = "must be a string, a list of strings, a list of token ids, or a list of lists of token ids"


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, texts, token ids, or lists of token ids (not wrapped in any template)."
    )
    max_tokens: int | None = Field(
        None, ge=0, description="Default 16 (OpenAI's), lowered to fit the context; 0 only with echo."
    )
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Return token log-probabilities, and the `logprobs` most likely tokens "
        "at each position in `top_logprobs` (null for 0)."
    )
    echo: bool | None = Field(None, description="Prepend the prompt to the text (with its logprobs when asked).")
    best_of: int | None = Field(None, ge=1, le=64, description="Only best_of == n is supported.")
    suffix: str | None = Field(None, description="Not supported (must be null).")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, v, handler):
        try:
            return handler(v)
        except ValidationError:
            raise ValueError(PROMPT_ERROR) from None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(description="Token texts; an incomplete UTF-8 sequence shows as `bytes:\\xNN...`.")
    token_logprobs: list[float | None] = Field(description="Natural-log probability; null for the first prompt token.")
    top_logprobs: list[dict[str, float] | None] | None = Field(
        None, description="Per token, the most likely tokens with their log-probabilities (null when logprobs is 0; "
        "null for the first prompt token, which has no context).")
    text_offset: list[int] = Field(description="Character offset of each token in `text`.")


class CompletionChoice(BaseModel):
    index: int = Field(description="prompt_index * n + sample_index")
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    token_ids: list[int] | None = Field(None, description="With return_token_ids: the generated ids.")
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids: the prompt ids.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="In streams: only in the last chunk, with include_usage.")


# -- OpenAI: chat -----------------------------------------------------------------


class TextPart(Request):
    type: Literal["text"]
    text: str


CONTENT_ERROR = "must be a string or a list of {\"type\": \"text\", \"text\": ...} parts"


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="user and assistant map to the template's ユーザー and システム; system (and developer) "
        "text is put in front of the first user message."
    )
    content: str | list[TextPart]
    name: str | None = Field(None, description="Ignored.")

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, v, handler):
        try:
            return handler(v)
        except ValidationError:
            raise ValueError(CONTENT_ERROR) from None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Default: the registry's max new tokens, lowered to fit the context."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens (newer name).")
    logprobs: bool | None = Field(None, description="Return the log-probability of each generated token.")
    tools: Any = Field(None, description="Not supported (the series has no tool calling): must be absent, null or [].")
    tool_choice: Any = Field(None, description="Not supported: must be absent, null or \"none\".")
    functions: Any = Field(None, description="Not supported (the older name of tools).")
    function_call: Any = Field(None, description="Not supported (the older name of tool_choice).")
    response_format: Any = Field(None, description="Only {\"type\": \"text\"}: no JSON mode or schemas.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the most likely tokens at "
                                     "each position, with their log-probabilities.")


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list = Field(default_factory=list, description="The most likely tokens here (`top_logprobs`).")


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# -- models -------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(description="What --model named (registry id, hub id or directory).")
    max_model_len: int = Field(description="The context length in tokens (prompt + completion).")
    aliases: list[str] = Field(default_factory=list, description="Other names accepted in `model`.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- Azure ML -----------------------------------------------------------------------


class AzureParameters(Request):
    """Generation settings of the Azure ML contract (transformers' names); unknown names are refused."""

    model_config = ConfigDict(strict=True, extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, description="Default: the registry's; capped by the context.")
    min_new_tokens: int | None = Field(None, ge=0)
    do_sample: bool | None = Field(None, description="Default: the registry's (true); false = greedy.")
    return_full_text: bool | None = Field(None, description="Prompt + continuation (default true, as in transformers).")
    temperature: float | None = Field(None, gt=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, **INT64)

    def generation_params(self, defaults: GenerationDefaults, max_new: int) -> GenerationParams:
        """transformers' semantics over the registry's defaults (`toolbox.params`, policy "azure")."""
        settings = Settings(max_new_tokens=max_new, min_new_tokens=self.min_new_tokens, temperature=self.temperature,
                            top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                            do_sample=self.do_sample, seed=self.seed)
        return generation_params(settings, defaults, "azure")


class AzureInput(Request):
    input_string: list[str] = Field(min_length=1)
    parameters: AzureParameters | None = None


class AzureRequest(BaseModel):
    """`{"input_data": {"input_string": [...], "parameters": {...}}}` or `{"input_data": [...], "params": {...}}`."""

    input_data: AzureInput | list[str]
    params: AzureParameters | None = None


class AzureStrings(RootModel):
    root: list[str] = Field(min_length=1)


class AzureResponse(RootModel):
    """One object per input: the text under key "0"; for a fine-tuned head, its classify or tag result."""

    root: list[dict]


# -- tokenizer ------------------------------------------------------------------------


class TokenizeRequest(Request):
    text: str | None = Field(None, description="The text (give text or prompt).")
    prompt: str | None = Field(None, description="The text, under vLLM's name (what lm-evaluation-harness sends).")
    model: str | None = None
    add_special_tokens: bool | None = Field(
        None, description="vLLM's flag: true appends </s>, as the series' original (T5) tokenizer does.")
    bos: bool = Field(False, description="Prepend <s>.")
    eos: bool = Field(False, description="Append </s>.")
    parse_special: bool = Field(False, description="Read literal `</s>`, `<s>` ... in the text as special tokens.")
    nl: bool = Field(False, description="Newlines become <NL> first (the instruction models' convention).")


class TokenizeResponse(BaseModel):
    ids: list[int]
    tokens: list[int] = Field(description="The ids again, under vLLM's name.")
    pieces: list[str]
    offsets: list[list[int]] = Field(description="[start, end) character span of each token in `text` (pairs).")
    count: int
    max_model_len: int


class DetokenizeRequest(Request):
    ids: list[int] | None = Field(None, description="Token ids (give ids, tokens or pieces).")
    tokens: list[int] | None = Field(None, description="Token ids, under vLLM's name.")
    pieces: list[str] | None = Field(None, description="Pieces such as `▁` or `<0xE3>` (give ids or pieces).")
    model: str | None = None
    nl: bool = Field(False, description="<NL> becomes a newline.")


class DetokenizeResponse(BaseModel):
    text: str
    prompt: str = Field(description="The text again, under vLLM's name.")
    ids: list[int]
    pieces: list[str]


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info, in vLLM's shape (lm-evaluation-harness' remote tokenizer reads it)."""

    tokenizer_class: str
    vocab_size: int
    model_max_length: int
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None = Field(description="A Jinja template of the series' instruction format "
                                      "(for the instruction variants), else null.")


class HeadRequest(Request):
    """POST /v1/classify and /v1/tag."""

    texts: list[str] = Field(min_length=1, description="The texts (each non-empty, within the context).")
    model: str | None = None


class HeadResponse(BaseModel):
    results: list[dict] = Field(description="Per text: classify {text, label, score, scores}; tag {text, entities: "
                                "[{start, end, label, text, score}]} (character offsets into the text).")


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "failed", "stopping"]
    model: str | None = None


# -- limits the handlers enforce, written into the OpenAPI document ------------------------


def document_limits(schemas: dict, max_sequences: int, max_body_bytes: int) -> None:
    """Put into the JSON schemas what the handlers check beyond the models' own validation, so that
    a client (or a fuzzer) generating requests from the document meets the same limits."""
    nonempty = {"type": "string", "minLength": 1}
    token = {"type": "integer", "minimum": 0}
    completion = schemas["CompletionRequest"]["properties"]
    completion["prompt"]["anyOf"] = [
        nonempty,
        {"type": "array", "minItems": 1, "items": nonempty},
        {"type": "array", "minItems": 1, "items": token},
        {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": token}},
    ]
    completion["prompt"]["description"] += (" Token ids must be within the vocabulary (/tokenizer_info). Prompts × n "
                                            f"may not exceed {max_sequences} sequences.")
    completion["best_of"]["description"] = "Only null or equal to n (several candidates are not ranked)."
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for penalty in ("presence_penalty", "frequency_penalty"):
            props[penalty]["anyOf"] = [{"type": "number", "enum": [0]}, {"type": "null"}]
        props["logit_bias"]["anyOf"] = [{"type": "object", "maxProperties": 0}, {"type": "null"}]
        props["n"]["description"] = f"Choices per prompt (default 1); at most {max_sequences} sequences in all."
        props["max_tokens"]["description"] += " Prompt + max_tokens must fit the context (/v1/models max_model_len)."
    chat = schemas["ChatCompletionRequest"]["properties"]
    for name in ("tools", "functions"):
        chat[name].update({"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}]})
    for name in ("tool_choice", "function_call"):
        chat[name].update({"anyOf": [{"type": "string", "enum": ["none"]}, {"type": "null"}]})
    chat["response_format"].update({"anyOf": [{"type": "object", "properties": {"type": {"enum": ["text"]}},
                                                "required": ["type"], "additionalProperties": False},
                                               {"type": "null"}]})
    chat["messages"]["description"] = "The conversation; its last message is a user message."
    schemas["AzureInput"]["properties"]["input_string"]["items"] = nonempty
    azure = schemas["AzureRequest"]["properties"]["input_data"]["anyOf"]
    azure[1].update({"items": nonempty, "minItems": 1})
    tokenize = schemas["TokenizeRequest"]
    tokenize["oneOf"] = [{"required": ["text"]}, {"required": ["prompt"]}]
    for name in ("text", "prompt"):
        tokenize["properties"][name].pop("anyOf", None)
        tokenize["properties"][name]["type"] = "string"
    detokenize = schemas["DetokenizeRequest"]
    detokenize["oneOf"] = [{"required": [k]} for k in ("ids", "tokens", "pieces")]
    for name in ("ids", "tokens"):
        detokenize["properties"][name].pop("anyOf", None)
        detokenize["properties"][name].update(type="array", items=token)
    detokenize["properties"]["pieces"].pop("anyOf", None)
    detokenize["properties"]["pieces"].update(type="array", items={"type": "string"})
    schemas["HeadRequest"]["properties"]["texts"]["items"] = nonempty
    for name in ("CompletionRequest", "ChatCompletionRequest", "AzureRequest", "TokenizeRequest", "DetokenizeRequest",
                 "HeadRequest"):
        schemas[name]["description"] = (schemas[name].get("description", "") +
                                        f" Bodies of at most {max_body_bytes} bytes, nested at most 64 levels.").strip()
