"""POST /score: the Azure ML real-time inference contract of the series' catalog card."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from toolbox.params import ParamError
from toolbox.serving import schemas as S
from toolbox.serving.common import (
    ClientGone,
    body,
    collect,
    encode,
    errors,
    fit_new_tokens,
    param_error,
    read_json,
    sample_specs,
    state_of,
    submit,
)
from toolbox.serving.schemas import APIError, validate

router = APIRouter(tags=["azure-ml"])


def parse(data) -> tuple[list[str], S.AzureParameters, str, str]:
    """(input strings, parameters, where the parameters are, where the strings are) of either request shape."""
    if not isinstance(data, dict):
        raise APIError(400, "body: must be a JSON object with input_data", param="body", code="invalid_type")
    if "input_data" not in data:
        raise APIError(400, "input_data: required field is missing", param="input_data", code="missing_field")
    inputs = data["input_data"]
    if isinstance(inputs, dict):
        if data.get("params") is not None:
            raise APIError(400, "params: goes with a list input_data; with an object input_data the settings go "
                           "in input_data.parameters", param="params", code="invalid_value")
        parsed = validate(S.AzureInput, inputs, ("input_data",))
        return (parsed.input_string, parsed.parameters or S.AzureParameters(), "input_data.parameters",
                "input_data.input_string")
    if isinstance(inputs, list):
        strings = validate(S.AzureStrings, inputs, ("input_data",)).root
        raw = data.get("params")
        return strings, validate(S.AzureParameters, {} if raw is None else raw, ("params",)), "params", "input_data"
    raise APIError(400, "input_data: must be an object with input_string, or a list of strings",
                   param="input_data", code="invalid_type")


@router.post("/score", response_model=S.AzureResponse, responses=errors(400, 401, 413, 429, 500, 503),
             openapi_extra=body(S.AzureRequest))
async def score(request: Request):
    """The Azure ML real-time contract: one `{"0": text}` per input string (raw text, no template)."""
    state = state_of(request)
    strings, params, where, str_where = parse(await read_json(request, state.settings.max_body_bytes))
    model, engine = state.ready()
    if model.head is not None:  # a fine-tuned classifier or tagger: its results, one per input
        from toolbox.serving.heads import run_head

        return JSONResponse(await run_head(state, model.head.task, strings, str_where))
    ctx, tok = model.context_length, model.tokenizer
    prompts, gens = [], []
    for i, s in enumerate(strings):
        if not s:
            raise APIError(400, f"{str_where}[{i}]: the input string is empty", param=f"{str_where}[{i}]",
                           code="invalid_value")
        ids = encode(tok, s)
        max_new = fit_new_tokens(len(ids), params.max_new_tokens, model.defaults.max_new_tokens, ctx,
                                 f"{str_where}[{i}]", f"{where}.max_new_tokens")
        try:
            gens.append(params.generation_params(model.defaults, max_new))
        except ParamError as exc:
            raise param_error(exc, prefix=f"{where}.") from None
        prompts.append(ids)
    sub = submit(state, engine, sample_specs(prompts, gens, 1, False), str_where)
    try:
        results = await collect(sub, request)
    except ClientGone:
        return Response(status_code=499)
    full = True if params.return_full_text is None else params.return_full_text
    return JSONResponse([{"0": (s if full else "") + r.text} for s, r in zip(strings, results)])
