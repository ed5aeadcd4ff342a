"""POST /tokenize and /detokenize: the model's sentencepiece tokenizer over HTTP."""

from __future__ import annotations

from fastapi import APIRouter, Request

from toolbox.prompts import from_model_text, to_model_text
from toolbox.serving import schemas as S
from toolbox.serving.common import body, errors, read_json, state_of
from toolbox.serving.schemas import APIError, validate

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize", response_model=S.TokenizeResponse, responses=errors(400, 401, 404, 413, 503),
             openapi_extra=body(S.TokenizeRequest))
async def tokenize(request: Request):
    """Ids, pieces and character spans of a text (sentencepiece, no special tokens unless asked)."""
    state = state_of(request)
    req = validate(S.TokenizeRequest, await read_json(request, state.settings.max_body_bytes))
    model, _ = state.serving(req.model)
    text = to_model_text(req.text) if req.nl else req.text
    try:
        tokens = model.tokenizer.tokens(text, bos=req.bos, eos=req.eos, parse_special=req.parse_special)
    except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer without bos
        raise APIError(400, f"text: {exc}", param="text", code="invalid_value") from None
    return {"ids": [t.id for t in tokens], "pieces": [t.piece for t in tokens],
            "offsets": [[t.start, t.end] for t in tokens], "count": len(tokens),
            "max_model_len": model.context_length}


@router.post("/detokenize", response_model=S.DetokenizeResponse, responses=errors(400, 401, 404, 413, 503),
             openapi_extra=body(S.DetokenizeRequest))
async def detokenize(request: Request):
    """Text of token ids or of pieces (give exactly one of `ids`, `pieces`)."""
    state = state_of(request)
    req = validate(S.DetokenizeRequest, await read_json(request, state.settings.max_body_bytes))
    model, _ = state.serving(req.model)
    tok = model.tokenizer
    if (req.ids is None) == (req.pieces is None):
        raise APIError(400, "ids: give exactly one of ids and pieces", param="ids", code="invalid_value")
    if req.ids is not None:
        ids = req.ids
        for i, t in enumerate(ids):
            if not 0 <= t < tok.vocab_size:
                raise APIError(400, f"ids[{i}]: token id {t} is outside the vocabulary (0..{tok.vocab_size - 1})",
                               param=f"ids[{i}]", code="invalid_value")
    else:
        ids = []
        for i, piece in enumerate(req.pieces):
            t = tok.piece_to_id(piece)
            if t is None:
                raise APIError(400, f"pieces[{i}]: unknown piece {piece!r}", param=f"pieces[{i}]", code="invalid_value")
            ids.append(t)
    text = tok.decode(ids)
    return {"text": from_model_text(text) if req.nl else text, "ids": ids, "pieces": [tok.id_to_piece(t) for t in ids]}
