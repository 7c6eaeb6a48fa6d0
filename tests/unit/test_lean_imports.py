"""coi's client loads httpx without httpx's optional command line, and leaves it importable."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import coi.backend.client
import httpx
out = {
    "skipped": "httpx._main" not in sys.modules and "pygments" not in sys.modules,
    "fallback": httpx.main.__module__,
}
try:  # a later, explicit import finds the real module (or fails as it really does)
    import httpx._main
    out["later"] = "real" if hasattr(httpx._main, "main") else "placeholder"
except ModuleNotFoundError as e:
    out["later"] = "real" if e.name in ("rich", "rich.console") else str(e)
print(json.dumps(out))
"""


def test_httpx_is_imported_without_its_command_line() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"skipped": True, "fallback": "httpx", "later": "real"}
