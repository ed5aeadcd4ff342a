"""POST /tokenize, /detokenize and GET /tokenizer_info: the model's sentencepiece tokenizer over HTTP.

The requests take vLLM's field names too (`prompt`, `add_special_tokens`, `tokens`) and the
answers carry them (`tokens`, `prompt`), so clients written for vLLM's tokenizer endpoints,
lm-evaluation-harness' remote tokenizer among them, use the model's real tokenizer.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from toolbox.errors import ToolboxError
from toolbox.prompts import CHAT_TEMPLATE, from_model_text, to_model_text
from toolbox.serving import schemas as S
from toolbox.serving.common import body, errors, offload, read_json, state_of
from toolbox.serving.schemas import APIError, validate

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize", response_model=S.TokenizeResponse, responses=errors(400, 401, 404, 413, 503),
             openapi_extra=body(S.TokenizeRequest))
async def tokenize(request: Request):
    """Ids, pieces and character spans of a text (sentencepiece, no special tokens unless asked)."""
    state = state_of(request)
    req = validate(S.TokenizeRequest, await read_json(request, state.settings.max_body_bytes))
    model, _ = state.serving(req.model)
    if (req.text is None) == (req.prompt is None):
        raise APIError(400, "text: give exactly one of text and prompt", param="text", code="invalid_value")
    field = "text" if req.text is not None else "prompt"
    text = req.text if req.text is not None else req.prompt
    text = to_model_text(text) if req.nl else text
    eos = req.eos or bool(req.add_special_tokens)
    try:
        tokens = await offload(model.tokenizer.tokens, text, bos=req.bos, eos=eos, parse_special=req.parse_special,
                               size=len(text))
    except ToolboxError as exc:  # e.g. a tokenizer without bos
        raise APIError(400, f"{field}: {exc}", param=field, code="invalid_value") from None
    ids = [t.id for t in tokens]
    return {"ids": ids, "tokens": ids, "pieces": [t.piece for t in tokens],
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
    given = [name for name in ("ids", "tokens", "pieces") if getattr(req, name) is not None]
    if len(given) != 1:
        raise APIError(400, "ids: give exactly one of ids, tokens and pieces", param="ids", code="invalid_value")
    if given[0] != "pieces":
        ids = getattr(req, given[0])
        for i, t in enumerate(ids):
            if not 0 <= t < tok.vocab_size:
                raise APIError(400, f"{given[0]}[{i}]: token id {t} is outside the vocabulary "
                               f"(0..{tok.vocab_size - 1})", param=f"{given[0]}[{i}]", code="invalid_value")
    else:
        ids = []
        for i, piece in enumerate(req.pieces):
            t = tok.piece_to_id(piece)
            if t is None:
                raise APIError(400, f"pieces[{i}]: unknown piece {piece!r}", param=f"pieces[{i}]", code="invalid_value")
            ids.append(t)
    text = tok.decode(ids)
    text = from_model_text(text) if req.nl else text
    return {"text": text, "prompt": text, "ids": ids, "pieces": [tok.id_to_piece(t) for t in ids]}


@router.get("/tokenizer_info", response_model=S.TokenizerInfo, responses=errors(401, 503))
async def tokenizer_info(request: Request):
    """The tokenizer's special tokens, vocabulary size, context and (instruction variants) chat template."""
    model, _ = state_of(request).ready()
    tok = model.tokenizer
    special = {name: tok.id_to_piece(i) for name, i in tok.special_ids.items()}
    return {"tokenizer_class": "sentencepiece", "vocab_size": tok.vocab_size, "model_max_length": model.context_length,
            "bos_token": special.get("bos"), "eos_token": special.get("eos"), "pad_token": special.get("pad"),
            "unk_token": special.get("unk"), "chat_template": CHAT_TEMPLATE if model.chat_template else None}
