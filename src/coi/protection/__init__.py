"""Protected paths: files that run on the host (git hooks, IDE tasks) the agent may not change."""
