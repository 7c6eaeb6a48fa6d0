"""The security monitor: host-side collection, pure detectors, responses and the audit log."""
