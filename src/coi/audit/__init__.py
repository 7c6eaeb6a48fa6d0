"""The audit log: one JSON Lines file per container under ~/.coi/audit."""

from coi.audit.log import AuditLog, Event, audit_dir, prune

__all__ = ["AuditLog", "Event", "audit_dir", "prune"]
