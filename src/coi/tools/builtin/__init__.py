"""The agent tools that ship with coi, one small module each."""
