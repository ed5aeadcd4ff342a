"""schemathesis over the server's own OpenAPI document, in-process on a tiny model.

Requests generated from the document (valid ones, and invalid ones for the negative
checks) must never get a 5xx, must be answered with a documented status, content type
and body shape, and schema-invalid ones must be refused. Schema-valid requests may still
be refused for limits no static schema can state (a prompt plus max_tokens over the
context, ids past the vocabulary, a conversation ending with the assistant), so the
"positive data acceptance" check is not among them; those limits are described in the
document instead.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

import toolbox  # noqa: E402
from toolbox.serving.app import Settings, create_app  # noqa: E402

CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.negative_data_rejection]
OPERATIONS = [("/v1/completions", "POST"), ("/v1/chat/completions", "POST"), ("/score", "POST"),
              ("/tokenize", "POST"), ("/detokenize", "POST"), ("/tokenizer_info", "GET"), ("/health", "GET"),
              ("/v1/models", "GET")]


@pytest.fixture(scope="module")
def schema(tiny_checkpoint, one_torch_thread):
    app = create_app(toolbox.load(str(tiny_checkpoint), threads=1), Settings(max_batch_size=8, max_queue=64))

    async def served(scope, receive, send):
        """The app without its lifespan: schemathesis' client runs it per request, and the shutdown
        half would stop the engine after the first one."""
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    return schemathesis.openapi.from_asgi("/openapi.json", served)


@pytest.mark.parametrize("path, method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_generated_requests(schema, path, method):
    operation = schema[path][method]

    @given(operation.as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        case.call_and_validate(checks=CHECKS)

    run()
