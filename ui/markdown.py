"""Alert messages as Markdown, the way Grafana OnCall's web templates show them.

markdown-it-py (a CommonMark parser) turns the text into HTML; nh3 (the Ammonia
sanitizer) then keeps only a fixed set of tags and attributes, drops scripts with their
content, allows http, https and mailto links and marks them noopener noreferrer nofollow.
Images never load by themselves: a Markdown image becomes a link whose click shows it
(see ui.js), so a payload cannot plant a tracking pixel; raw <img> tags are removed.
"""
from __future__ import annotations

from functools import lru_cache

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup, escape

from .filters import href

TAGS = {"a", "p", "br", "hr", "em", "strong", "del", "s", "code", "pre", "blockquote", "ul", "ol", "li",
        "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "span", "details", "summary"}
ATTRIBUTES = {"a": {"href", "title", "data-image", "class"}, "th": {"align"}, "td": {"align"}, "ol": {"start"},
              "code": {"class"}}
SCHEMES = {"http", "https", "mailto"}
MAX_CHARS = 100_000  # a longer message is shown as plain text


def _image(self, tokens, idx, options, env) -> str:
    """A Markdown image as a link to it that shows it on click (never loaded on its own)."""
    token = tokens[idx]
    url = href(token.attrGet("src"))
    alt = self.renderInlineAsText(token.children or [], options, env) or "image"
    if url is None:
        return str(escape(f"[image: {alt}]"))
    return f'<a href="{escape(url)}" class="md-image" data-image="{escape(url)}">Show image: {escape(alt)}</a>'


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": True, "breaks": True}).enable(["table", "strikethrough"])
    md.add_render_rule("image", _image)
    return md


@lru_cache(maxsize=512)
def render_markdown(text: str | None) -> Markup:
    """Safe HTML for a message written in Markdown (cached: a group page renders the same few)."""
    if not text:
        return Markup("")
    if len(text) > MAX_CHARS:
        return Markup("<pre>") + escape(text) + Markup("</pre>")
    html = _parser().render(text)
    return Markup(nh3.clean(html, tags=TAGS, attributes=ATTRIBUTES, url_schemes=SCHEMES,
                            link_rel="noopener noreferrer nofollow"))
