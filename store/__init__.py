"""tocsin's ground floor: the database. Nothing else writes SQL; this imports nothing of ours."""
from .db import (
    ALLOWED_FROM,
    SCHEMA_VERSION,
    DatabaseUnusable,
    Group,
    InvalidTransition,
    InvalidWrite,
    NewAlert,
    NotFound,
    Store,
    StoredAlert,
    StoreUnavailable,
    examine,
    public_id,
)
from .lock import DatabaseLocked, ServeLock

__all__ = [
    "ALLOWED_FROM", "DatabaseLocked", "DatabaseUnusable", "Group", "InvalidTransition", "InvalidWrite", "NewAlert",
    "NotFound", "SCHEMA_VERSION", "ServeLock", "Store", "StoredAlert", "StoreUnavailable", "examine", "public_id",
]
