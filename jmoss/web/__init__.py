"""The chat page ``jmoss serve`` shows at ``GET /``: one self-contained HTML document.

The page (index.html, style.css, app.js beside this file) is assembled once per app with the
server's settings in a JSON data block, so it needs no CDN, no build step and no network beyond
the server's own OpenAI endpoint. Model output is untrusted: app.js builds the DOM with text nodes
only, and the Content-Security-Policy below allows just this page's own script (by hash) and
requests to its own origin, so even a renderer bug could not run injected code or load images.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Page:
    html: str
    headers: dict[str, str]


def _json_for_html(value: Any) -> str:
    """JSON that cannot close the surrounding <script> element or open a comment."""
    text = json.dumps(value, ensure_ascii=False)
    for raw, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def render_page(config: dict[str, Any]) -> Page:
    """The page with ``config`` (model name, meta instruction, plugins, limits) embedded."""
    folder = resources.files(__name__)
    html = folder.joinpath("index.html").read_text(encoding="utf-8")
    css = folder.joinpath("style.css").read_text(encoding="utf-8")
    js = folder.joinpath("app.js").read_text(encoding="utf-8")
    if "</script" in js.lower() or "</style" in css.lower():
        raise ValueError("the page's script or style would close its own element")
    script_hash = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    style_hash = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii")
    html = (html.replace("/*JMOSS_STYLE*/", css, 1).replace("/*JMOSS_SCRIPT*/", js, 1)
            .replace("/*JMOSS_CONFIG*/", _json_for_html(config), 1))
    csp = ("default-src 'none'; "
           f"script-src 'sha256-{script_hash}'; style-src 'sha256-{style_hash}'; "
           "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return Page(html, {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                       "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})
