"""Agent sessions: naming, slots, workspaces, sandboxes, saved conversations."""
