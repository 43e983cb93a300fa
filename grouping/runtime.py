"""What one config generation serves with besides its integrations: built once from the
parsed config by the daemon, carried by the Pipeline and swapped whole with it on reload,
so the API and the escalation engine read one object instead of a getter per setting."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Settings:
    """The running config's values that the API and the engine need."""

    public_url: str = "http://127.0.0.1:8080"
    api_tokens: tuple[str, ...] = ()
    email_domain: str | None = None                                # inbound email addresses' domain
    notifiers: Mapping[str, Any] = field(default_factory=dict)     # name -> escalation.notifiers.NotifierConfig
    heartbeat_timeouts: Mapping[str, float] = field(default_factory=dict)  # integration id -> seconds
