"""Host set-up: installing, starting and initializing the container daemon."""
