"""Images coi builds and manages: the tiny test image and the full agent image."""
