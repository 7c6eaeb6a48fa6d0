"""`coi health`: diagnose the host, the daemon and coi's own state."""
