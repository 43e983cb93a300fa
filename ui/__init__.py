"""The web interface under /ui/ (issue 6): integrations, template editor with live preview, alert groups."""
from __future__ import annotations


def setup_ui(app, daemon) -> None:
    """Mount the UI's routes on `app`. `daemon` is duck-typed: .current() -> Pipeline,
    .store, .config (api_tokens, path, daemon.public_url, smtp.domain), .reload(path) -> bool."""
