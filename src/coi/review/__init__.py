"""Review mode: the agent works on a copy; the user diffs, applies or discards it."""
