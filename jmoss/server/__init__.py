"""``jmoss serve``: MOSS's uid-history JSON API and an OpenAI-compatible API over one loaded model.

    app = create_app(jmoss.load("fnlp/moss-moon-003-sft"), plugins=["calculator"])
    serve(model, host="127.0.0.1", port=19324)

Endpoints: ``POST /`` (moss_api_demo.py's request and reply, moss-spec §5.4), ``GET /`` (a chat page
for browsers, jmoss.web; off with ``web=False``), ``GET /metrics``, ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions`` (both optionally streamed as server-sent
events ending in ``data: [DONE]``) and ``GET /health``. Every error is a 4xx/5xx JSON body in
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

The modules, in the order a request passes them:

- :mod:`jmoss.server.auth`: API keys (``Authorization: Bearer``), checked before anything else.
- :mod:`jmoss.server.metrics`: ``GET /metrics`` (prometheus-client) and the request counter.
- :mod:`jmoss.server.schemas`: request bodies and their validation, sampling options, errors,
  OpenAI's finish reasons and usage, chat messages in MOSS's format.
- :mod:`jmoss.server.response_format`: ``response_format`` as a token constraint (jmoss.constraints).
- :mod:`jmoss.server.tools`: OpenAI ``tools``/``tool_calls`` rendered into and read from MOSS's
  plugin protocol.
- :mod:`jmoss.server.routes`: the FastAPI app (:func:`create_app`) and its routes; handlers parse,
  validate and tokenize, then relay a worker job's events (streamed as SSE). A client that hangs
  up cancels its job.
- :mod:`jmoss.server.worker`: the one thread that owns the model and its KV cache (or the batch
  runner's slots with ``max_batch`` > 1), bounded admission, the uid conversations and what the
  cache holds; a job's generation stops at the next step once its client has gone.
- :mod:`jmoss.server.transport`: uvicorn's protocol with client timeouts, and :func:`serve`.
"""

from jmoss.server.routes import create_app
from jmoss.server.schemas import MOSS_DEFAULTS, ServerRequestError, default_meta_instruction
from jmoss.server.transport import (
    DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_PORT, serve,
    timed_protocol,
)

__all__ = [
    "DEFAULT_BODY_TIMEOUT", "DEFAULT_HEADER_TIMEOUT", "DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_CONNECTIONS", "DEFAULT_PORT",
    "MOSS_DEFAULTS", "ServerRequestError", "create_app", "default_meta_instruction", "serve", "timed_protocol",
]
