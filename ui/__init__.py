"""The web interface under /ui/ (issue 6): integrations, template editor with live preview, alert groups."""
from __future__ import annotations

from aiohttp import web

from .views import Views

UI_KEY = web.AppKey("tocsin_ui", Views)


def setup_ui(app: web.Application, daemon) -> None:
    """Mount the UI's routes on `app`. `daemon` is duck-typed: .current() -> Pipeline,
    .store, .config (api_tokens, path, daemon.public_url, smtp.domain), .reload(path) -> bool.

    The UI is a sub-application, so its guard (session, CSRF, security headers) runs for
    /ui/ only and ingestion pays nothing for it.
    """
    views = Views(daemon)
    ui = web.Application(middlewares=[views.guard])
    ui.add_routes(views.routes())
    app.add_subapp("/ui", ui)
    app[UI_KEY] = views
