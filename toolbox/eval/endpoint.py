"""An OpenAI-compatible server as the model of a run (`--endpoint URL`): toolbox serve, vLLM, ...

Generation goes through `/v1/completions` with a batch of prompts per request. Log-likelihoods
come from the same endpoint with `echo` and `logprobs`: the server returns every prompt
token's log-probability and character offset, and the tokens that end after the context
are the continuation's (a token that straddles the boundary counts with the continuation).
The first token of a text has no log-probability (nothing precedes it), so perplexity over
an endpoint scores every token but the first, as `toolbox score` does.
"""

from __future__ import annotations

from toolbox.errors import ToolboxError
from toolbox.prompts import chat_prompt, from_model_text


class Endpoint:
    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600):
        try:
            import httpx
        except ImportError:
            raise ToolboxError("--endpoint needs httpx: pip install 'rinna-toolbox[eval]'") from None
        base = url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url, self._http = url, httpx.Client(base_url=base, headers=headers, timeout=timeout)
        self._errors = (httpx.HTTPError,)
        self.model = model or self._first_model()
        self.name = f"{self.model} at {url}"

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            r = self._http.request(method, path, json=body)
        except self._errors as exc:
            raise ToolboxError(f"--endpoint {self.url}: {type(exc).__name__}: {exc}") from None
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise ToolboxError(f"--endpoint {self.url}: HTTP {r.status_code} on {path}: {message}")
        return r.json()

    def _first_model(self) -> str:
        models = self._request("GET", "/models").get("data") or []
        if not models:
            raise ToolboxError(f"--endpoint {self.url}: the server lists no model; name one with --endpoint-model")
        return models[0]["id"]

    def generate(self, prompts, wheres, generation, prompt_format, truncate):
        chat = prompt_format == "rinna-chat"  # "auto" means plain here: the server's completions take raw text
        body = {
            "model": self.model,
            "prompt": [chat_prompt([("user", p)]) if chat else p for p in prompts],
            "max_tokens": generation.get("max_new_tokens", 128),
            "temperature": generation.get("temperature", 0.0),
        }
        for name in ("top_p", "seed", "top_k", "repetition_penalty"):
            if generation.get(name) is not None:
                body[name] = generation[name]
        if generation.get("stop"):
            body["stop"] = list(generation["stop"])
        reply = self._request("POST", "/completions", body)
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        outputs = [(from_model_text(c["text"]) if chat else c["text"], None, c.get("finish_reason")) for c in choices]
        return outputs, int((reply.get("usage") or {}).get("completion_tokens") or 0)

    def _echo(self, texts: list[str], per_request: int = 32) -> tuple[list[dict], int]:
        found, tokens = [], 0
        for start in range(0, len(texts), per_request):
            body = {"model": self.model, "prompt": texts[start : start + per_request], "max_tokens": 1,
                    "temperature": 0.0, "echo": True, "logprobs": 1}
            reply = self._request("POST", "/completions", body)
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            if any(not c.get("logprobs") or "text_offset" not in c["logprobs"] for c in choices):
                raise ToolboxError(f"--endpoint {self.url}: the server returned no prompt logprobs for echo")
            found += [c["logprobs"] for c in choices]
            tokens += int((reply.get("usage") or {}).get("prompt_tokens") or 0)
        return found, tokens

    def loglikelihood(self, pairs, wheres):
        found, tokens = self._echo([c + x for c, x in pairs])
        out = []
        for (context, continuation), lp in zip(pairs, found):
            end, cut = len(context) + len(continuation), len(context)
            offsets, logprobs = lp["text_offset"], lp["token_logprobs"]
            top = lp.get("top_logprobs")
            total, greedy, count = 0.0, top is not None, 0
            for i, (start, value) in enumerate(zip(offsets, logprobs)):
                stop = offsets[i + 1] if i + 1 < len(offsets) else end
                if start >= end or (start < cut and stop <= cut) or value is None:
                    continue
                total += value
                count += 1
                if greedy:
                    best = top[i] or {}
                    greedy = not best or max(best.values()) <= value + 1e-6
            out.append((total, greedy and count > 0, count))
        return out

    def score(self, texts):
        found, _ = self._echo(list(texts))
        out = []
        for text, lp in zip(texts, found):
            pairs = zip(lp["text_offset"], lp["token_logprobs"])
            values = [v for start, v in pairs if start < len(text) and v is not None]
            out.append((-sum(values), len(values)))
        return out
