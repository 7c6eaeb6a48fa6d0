"""The credential broker: the agent's API keys and logins stay on the host (docs/credentials.md).

The session code calls one thing, `session_broker(client, container, tool, cfg)`, a context
manager yielding a `BrokerHandle`: the environment and settings that point the tool at the
broker, the proxy device that connects the sandbox to it, and the credential files and host
variables that must stay out. The heavy parts (the server, httpx, uvicorn) are imported
only when a broker starts.
"""

from __future__ import annotations

from coi.credentials.session import BROKER_PORT, DEVICE, BrokerHandle, Plan, plan, session_broker

__all__ = ["BROKER_PORT", "DEVICE", "BrokerHandle", "Plan", "plan", "session_broker"]
