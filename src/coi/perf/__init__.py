"""Measuring coi against the daemon it drives: `coi bench` (see docs/performance.md)."""
