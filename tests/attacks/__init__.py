"""The project's own attack suite against the security monitor (issue 25)."""
