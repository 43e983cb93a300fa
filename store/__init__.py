"""tocsin's ground floor: the database. Nothing else writes SQL; this imports nothing of ours."""
from .db import (
    ALLOWED_FROM,
    Group,
    InvalidTransition,
    NewAlert,
    NotFound,
    Store,
    StoredAlert,
    StoreUnavailable,
    public_id,
)

__all__ = [
    "ALLOWED_FROM", "Group", "InvalidTransition", "NewAlert", "NotFound", "Store", "StoredAlert",
    "StoreUnavailable", "public_id",
]
