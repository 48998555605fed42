"""``response_format``: OpenAI's structured output, enforced at every sampled token (jmoss.constraints).

``{"type": "json_object"}`` asks for any JSON object, ``{"type": "json_schema", "json_schema":
{"name", "schema"}}`` for a document valid under the schema. The schema is compiled per request
(llguidance: ~1 ms, off the event loop); one it cannot enforce is a 400 that names the feature.
A chat reply may start with the one space MOSS writes after ``<|MOSS|>:`` (it is not part of the
reply); a completion is the JSON alone. An output cut by max_tokens before it closes is returned
as it stands with finish_reason "length", as OpenAI does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jmoss.errors import ConstraintError
from jmoss.server.schemas import ResponseFormat, ServerRequestError

if TYPE_CHECKING:
    from jmoss.constraints import Grammar
    from jmoss.tokenizer import Tokenizer


def constraint_for(fmt: ResponseFormat | None, tokenizer: "Tokenizer", eos_token_id: int | None, *,
                   reply: bool) -> "Grammar | None":
    """The constraint ``fmt`` asks for (None for text); ``reply``: the output follows "<|MOSS|>:"."""
    if fmt is None or fmt.type == "text":
        return None
    from jmoss.constraints import json_schema

    schema = None
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ServerRequestError(400, "response_format of type json_schema needs a json_schema object",
                                     param="response_format.json_schema", code="missing_parameter")
        schema = fmt.json_schema.schema_
    try:
        return json_schema(tokenizer, schema, eos_token_id=eos_token_id, leading_space=reply)
    except ConstraintError as exc:
        raise ServerRequestError(400, f"response_format: {exc}", param="response_format.json_schema.schema",
                                 code="unsupported_schema") from None
