"""The OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Handlers validate the body into a request model, which converts itself into generation
parameters (`generation_params`, the library's "openai" policy); prompts are built with
the library's template code; the engine generates; the handlers only format.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from toolbox.errors import ToolboxError
from toolbox.params import ParamError
from toolbox.prompts import chat_prompt, message_turns, with_instructions
from toolbox.results import Sample
from toolbox.serving import schemas as S
from toolbox.serving.common import (
    DONE,
    SSE_HEADERS,
    ClientGone,
    body,
    check_capacity,
    chunker,
    collect,
    encode,
    errors,
    fit_new_tokens,
    offload,
    param_error,
    read_json,
    sample_specs,
    state_of,
    stream_error,
    streaming,
    submit,
    token_string,
    top_entries,
    usage,
)
from toolbox.serving.engine import EngineFailure, NotAccepting, Overloaded
from toolbox.serving.schemas import APIError, validate

router = APIRouter(tags=["openai"])


def request_params(req, model, max_new: int, top_logprobs: int = 0):
    """The request's generation parameters; a refused setting is a 400 naming its field."""
    try:
        return req.generation_params(model.defaults, max_new, top_logprobs)
    except ParamError as exc:
        raise param_error(exc, req.NAMES) from None


def unsupported(req) -> None:
    """Settings the server cannot honour are refused by name, never silently ignored."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name}: only 0 is supported", param=name, code="unsupported_parameter")
    if req.logit_bias:
        raise APIError(400, "logit_bias: not supported", param="logit_bias", code="unsupported_parameter")
    for name in ("tools", "functions"):
        if getattr(req, name, None) not in (None, []):
            raise APIError(400, f"{name}: not supported (the series' models have no tool calling)", param=name,
                           code="unsupported_parameter")
    for name in ("tool_choice", "function_call"):
        if getattr(req, name, None) not in (None, "none"):
            raise APIError(400, f"{name}: not supported (the series' models have no tool calling)", param=name,
                           code="unsupported_parameter")
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(400, "response_format: only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
                       param="response_format", code="unsupported_parameter")


def chat_turns(messages: list[S.ChatMessage]) -> list[tuple[str, str]]:
    """The template's turns of the messages (system text in front of the first user message)."""
    try:
        instructions, turns = message_turns([(m.role, m.text) for m in messages])
    except ToolboxError as exc:
        param = str(exc).partition(":")[0]
        raise APIError(400, str(exc), param=param, code="invalid_value") from None
    return with_instructions(instructions, turns)


# -- models -------------------------------------------------------------------------


def model_card(state) -> dict:
    model, _ = state.ready()
    owner = "rinna" if model.spec and model.name.startswith("rinna/") else "toolbox"
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": owner,
            "root": model.name, "max_model_len": model.context_length, "aliases": state.aliases}


@router.get("/v1/models", response_model=S.ModelList, responses=errors(401, 503))
async def list_models(request: Request):
    """The served model (one)."""
    return {"object": "list", "data": [model_card(state_of(request))]}


@router.get("/v1/models/{model_id:path}", response_model=S.ModelCard, responses=errors(401, 404, 503))
async def get_model(model_id: str, request: Request):
    """One model by name (the served name or an alias)."""
    state = state_of(request)
    card = model_card(state)
    state.check_model(model_id)
    return card


# -- prompts ------------------------------------------------------------------------


@dataclass
class Prompt:
    ids: list[int]
    text: str  # the prompt as text (echoed)
    offsets: list[int]  # character offset of each prompt token in `text`
    where: str = "prompt"  # the request field it came from


def completion_items(req: S.CompletionRequest) -> tuple[list, bool]:
    """The request's prompts (texts or id lists) and whether it gave a single one."""
    p = req.prompt
    if isinstance(p, str):
        return [p], True
    if not p:
        raise APIError(400, "prompt: the list is empty", param="prompt", code="invalid_value")
    if isinstance(p[0], int):
        return [list(p)], True
    return list(p), False


def completion_prompts(items: list, single: bool, tokenizer, need_offsets: bool) -> list[Prompt]:
    prompts = []
    for i, item in enumerate(items):
        where = "prompt" if single else f"prompt[{i}]"
        if not item:
            raise APIError(400, f"{where}: the prompt is empty", param=where, code="invalid_value")
        if isinstance(item, str):
            if need_offsets:
                toks = tokenizer.tokens(item)
                prompts.append(Prompt([t.id for t in toks], item, [t.start for t in toks], where))
            else:
                prompts.append(Prompt(encode(tokenizer, item), item, [], where))
        else:
            bad = next((t for t in item if not 0 <= t < tokenizer.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"{where}: token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                               param=where, code="invalid_value")
            text, offsets = decode_with_offsets(tokenizer, item)
            prompts.append(Prompt(list(item), text, offsets, where))
    return prompts


def decode_with_offsets(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    from toolbox.streaming import TextAssembler

    text = TextAssembler(tokenizer.token_bytes)
    offsets, out = [], ""
    for t in ids:
        offsets.append(len(out))
        out += text.push(t)
    return out + text.finish(), offsets


# -- completions and chat -----------------------------------------------------------


@router.post("/v1/completions", responses={**streaming(S.CompletionResponse, "completion"),
             **errors(400, 401, 404, 413, 429, 500, 503)}, openapi_extra=body(S.CompletionRequest))
async def completions(request: Request):
    """OpenAI completions: raw prompts (no template), `n`, `stop`, `seed`, `logprobs`, `echo`, streaming."""
    state = state_of(request)
    req = validate(S.CompletionRequest, await read_json(request, state.settings.max_body_bytes))
    model, engine = state.generating(req.model)
    unsupported(req)
    if req.suffix is not None:
        raise APIError(400, "suffix: not supported", param="suffix", code="unsupported_parameter")
    n = req.n or 1
    if req.best_of is not None and req.best_of != n:
        raise APIError(400, "best_of: only best_of == n is supported", param="best_of", code="unsupported_parameter")
    echo, want_lp, stream = bool(req.echo), req.logprobs is not None, bool(req.stream)
    if req.max_tokens == 0 and not echo:
        raise APIError(400, "max_tokens: must be at least 1 (0 only with echo)", param="max_tokens",
                       code="invalid_value")
    tok, ctx = model.tokenizer, model.context_length
    items, single = completion_items(req)
    check_capacity(engine, len(items) * n)  # before any tokenizing
    size = sum(len(x) for x in items)
    prompts = await offload(completion_prompts, items, single, tok, echo and want_lp, size=size)
    k = req.logprobs or 0
    params = []
    for p in prompts:
        max_new = fit_new_tokens(len(p.ids), req.max_tokens, 16, ctx, p.where, "max_tokens")
        params.append(request_params(req, model, max(max_new, 1), k))
    prompt_scores = None
    if echo and want_lp:
        ids = [p.ids for p in prompts]
        try:
            prompt_scores = await engine.call(lambda: model.loaded.score_top(ids, [1] * len(ids), k) if k
                                              else model.loaded.score(ids))
        except Overloaded as exc:
            raise APIError(429, str(exc), code="queue_full", type="rate_limit_error",
                           headers={"Retry-After": str(state.settings.retry_after)}) from None
        except NotAccepting as exc:
            raise APIError(503, str(exc), code="shutting_down") from None
        except Exception as exc:  # noqa: BLE001 - a scoring error on valid input is the server's fault
            raise APIError(500, f"scoring failed: {exc}", code="scoring_failed") from None
    generate = req.max_tokens != 0
    sub = submit(state, engine, sample_specs([p.ids for p in prompts], params, n, False)) if generate else None
    rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.name
    prompt_tokens = sum(len(p.ids) for p in prompts)

    def prompt_lp(p: Prompt, scores) -> dict:
        lps = [None, *scores.logprobs] if p.ids else []
        tops = [None, *(top_entries(tok, t) for t in scores.top)] if k and p.ids else None
        return {"tokens": [token_string(tok, t) for t in p.ids], "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": list(p.offsets)}

    def gen_lp(ids, lps, deltas, base: int, tops) -> dict:
        offsets, at = [], base
        for d in deltas:
            offsets.append(at)
            at += len(d)
        return {"tokens": [token_string(tok, t) for t in ids], "token_logprobs": list(lps),
                "top_logprobs": [top_entries(tok, t) for t in tops] if k else None, "text_offset": offsets}

    if not stream:
        if sub is not None:
            try:
                results = await collect(sub, request)
            except ClientGone:
                return Response(status_code=499)
        else:
            results = [Sample(finish_reason="length") for _ in range(len(prompts) * n)]
        choices = []
        for i, r in enumerate(results):
            p = prompts[i // n]
            head = p.text if echo else ""
            choice = {"index": i, "text": head + r.text, "logprobs": None, "finish_reason": r.finish_reason}
            if want_lp:
                lp = gen_lp(r.token_ids, r.logprobs, r.deltas, len(head), r.tops)
                if echo:
                    pl = prompt_lp(p, prompt_scores[i // n])
                    lp = {key: (None if pl[key] is None else pl[key] + lp[key]) for key in lp}
                choice["logprobs"] = lp
            if req.return_token_ids:
                choice["token_ids"] = r.token_ids
                choice["prompt_token_ids"] = p.ids
            choices.append(choice)
        completion_tokens = sum(len(r.token_ids) for r in results)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": name,
                             "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    chunk = chunker(rid, "text_completion", created, name)

    async def events():
        offsets = [len(prompts[i // n].text) if echo else 0 for i in range(len(prompts) * n)]
        completion_tokens = 0
        try:
            if echo:
                head = []
                for i in range(len(prompts) * n):
                    p = prompts[i // n]
                    c = {"index": i, "text": p.text, "logprobs": prompt_lp(p, prompt_scores[i // n]) if want_lp else None,
                         "finish_reason": None if generate else "length"}
                    head.append(chunk([c]))
                yield "".join(head)
            if sub is not None:
                async for batch in sub.batches():
                    parts = []
                    for out in batch:
                        completion_tokens += 1
                        if not out.text and out.finish_reason is None and not want_lp and not req.return_token_ids:
                            continue
                        c = {"index": out.index, "text": out.text, "logprobs": None,
                             "finish_reason": out.finish_reason}
                        if want_lp:
                            c["logprobs"] = gen_lp([out.token_id], [out.logprob], [out.text], offsets[out.index],
                                                   [out.top] if out.top else [])
                        if req.return_token_ids:
                            c["token_ids"] = [out.token_id]
                        offsets[out.index] += len(out.text)
                        parts.append(chunk([c]))
                    if parts:
                        yield "".join(parts)
            if include_usage:
                yield chunk([], {"usage": usage(prompt_tokens, completion_tokens)})
            yield DONE
        except (EngineFailure, NotAccepting) as exc:
            yield stream_error(exc)
        finally:
            if sub is not None:
                sub.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

# -- OpenAI chat --

@router.post("/v1/chat/completions", responses={**streaming(S.ChatCompletionResponse, "chat completion"),
             **errors(400, 401, 404, 413, 429, 500, 503)}, openapi_extra=body(S.ChatCompletionRequest))
async def chat_completions(request: Request):
    """OpenAI chat: messages through the series' template (ユーザー/システム, <NL>); see docs/serve.md for `system`."""
    state = state_of(request)
    req = validate(S.ChatCompletionRequest, await read_json(request, state.settings.max_body_bytes))
    model, engine = state.generating(req.model)
    unsupported(req)
    n = req.n or 1
    check_capacity(engine, n)
    tok, ctx = model.tokenizer, model.context_length
    text = chat_prompt(chat_turns(req.messages))
    ids = await offload(encode, tok, text, size=len(text))
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = fit_new_tokens(len(ids), requested, model.defaults.max_new_tokens, ctx, "messages", max_param)
    want_lp = bool(req.logprobs)
    if req.top_logprobs and not want_lp:
        raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs", code="invalid_value")
    k = req.top_logprobs or 0
    params = request_params(req, model, max_new, k)
    sub = submit(state, engine, sample_specs([ids], [params], n, True))
    rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.name

    def entry(t: int, lp: float) -> dict:
        return {"token": token_string(tok, t), "logprob": lp, "bytes": list(tok.token_bytes[t])}

    def lp_entries(token_ids, lps, tops):
        tops = tops if k else [()] * len(token_ids)
        return [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                for t, lp, top in zip(token_ids, lps, tops)]

    if not req.stream:
        try:
            results = await collect(sub, request)
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for i, r in enumerate(results):
            c = {"index": i, "message": {"role": "assistant", "content": r.text},
                 "logprobs": {"content": lp_entries(r.token_ids, r.logprobs, r.tops)} if want_lp else None,
                 "finish_reason": r.finish_reason}
            if req.return_token_ids:
                c["token_ids"] = r.token_ids
            choices.append(c)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": name,
                             "choices": choices,
                             "usage": usage(len(ids), sum(len(r.token_ids) for r in results))})

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    chunk = chunker(rid, "chat.completion.chunk", created, name)

    async def events():
        completion_tokens = 0
        try:
            yield "".join(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for i in range(n))
            async for batch in sub.batches():
                parts = []
                for out in batch:
                    completion_tokens += 1
                    if not out.text and out.finish_reason is None and not want_lp:
                        continue
                    c = {"index": out.index, "delta": {"content": out.text} if out.text else {},
                         "logprobs": {"content": lp_entries([out.token_id], [out.logprob], [out.top])}
                         if want_lp else None,
                         "finish_reason": out.finish_reason}
                    if req.return_token_ids:
                        c["token_ids"] = [out.token_id]
                    parts.append(chunk([c]))
                if parts:
                    yield "".join(parts)
            if include_usage:
                yield chunk([], {"usage": usage(len(ids), completion_tokens)})
            yield DONE
        except (EngineFailure, NotAccepting) as exc:
            yield stream_error(exc)
        finally:
            sub.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
