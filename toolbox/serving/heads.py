"""POST /v1/classify and /v1/tag: a fine-tuned classifier or tagger (`toolbox finetune`) over HTTP.

A head is one forward pass per batch of texts, with no decoding loop, so it runs on a
worker thread (one batch at a time) rather than through the generation engine. The Azure
ML `/score` contract answers with the same results for such a model.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from toolbox.errors import ToolboxError
from toolbox.serving import schemas as S
from toolbox.serving.common import body, errors, read_json, state_of
from toolbox.serving.schemas import APIError, validate

router = APIRouter(tags=["fine-tuned heads"])


async def run_head(state, task: str, texts: list[str], where: str) -> list[dict]:
    """`Model.classify` / `Model.tag` of `texts` off the event loop, as JSON-ready dicts."""
    model = state.model
    if model.head is None or model.head.task != task:
        kind = "a language model" if model.head is None else f"a {model.head.task} model"
        raise APIError(400, f"model: {state.name} is {kind}; /v1/{task} needs a model made by `toolbox finetune "
                       f"{task}`", param="model", code="wrong_model_type")
    for i, text in enumerate(texts):
        if not text:
            raise APIError(400, f"{where}[{i}]: the text is empty", param=f"{where}[{i}]", code="invalid_value")
    lock = state.head_lock

    def work():
        with lock:
            return [r.to_dict() for r in getattr(model, task)(texts)]

    try:
        return await asyncio.to_thread(work)
    except ToolboxError as exc:  # a text longer than the context, ...
        raise APIError(400, f"{where}: {exc}", param=where, code="invalid_value") from None


@router.post("/v1/classify", response_model=S.HeadResponse, responses=errors(400, 401, 404, 413, 503),
             openapi_extra=body(S.HeadRequest))
async def classify(request: Request):
    """Each text's label and the probability of every label (a model made by `toolbox finetune classify`)."""
    return await _answer(request, "classify")


@router.post("/v1/tag", response_model=S.HeadResponse, responses=errors(400, 401, 404, 413, 503),
             openapi_extra=body(S.HeadRequest))
async def tag(request: Request):
    """Each text's entities as character spans (a model made by `toolbox finetune tag`)."""
    return await _answer(request, "tag")


async def _answer(request: Request, task: str) -> dict:
    """A `HeadRequest` validated and run through the served model's `task`."""
    state = state_of(request)
    req = validate(S.HeadRequest, await read_json(request, state.settings.max_body_bytes))
    state.serving(req.model)
    return {"results": await run_head(state, task, req.texts, "texts")}
