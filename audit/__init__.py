"""The audit trail: each state change a person or a token makes, with who, when, from where
and what (audit.trail). The services call record() inside the transaction of the change."""

from audit.trail import (
    AuditMiddleware,
    acting_as,
    current_actor,
    record,
    record_save,
    stored,
    unrecorded,
)

__all__ = [
    "AuditMiddleware",
    "acting_as",
    "current_actor",
    "record",
    "record_save",
    "stored",
    "unrecorded",
]
