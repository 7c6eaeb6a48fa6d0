"""The public surface: `coi.__all__` is what docs/sdk.md lists, every name resolves, the page's
examples pass `mypy --strict` using nothing else, and importing `coi` stays cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import ROOT
from tests.sdkdocs import examples, listed_names

import coi
import coi.backend

# coi.backend's public names: the daemon client and its models (changing them is an API change).
BACKEND_NAMES = {
    "Endpoint",
    "ExecRequest",
    "ExecResult",
    "ExecSession",
    "Image",
    "IncusClient",
    "Instance",
    "InstanceState",
    "Network",
    "NetworkACL",
    "ServerInfo",
    "Snapshot",
    "StoragePool",
}


def test_all_is_exactly_what_the_docs_list() -> None:
    assert set(coi.__all__) == listed_names()
    assert len(coi.__all__) == len(set(coi.__all__))


def test_every_public_name_resolves() -> None:
    for name in coi.__all__:
        assert getattr(coi, name) is not None, name
    with pytest.raises(AttributeError):
        _ = coi.NoSuchThing  # type: ignore[attr-defined]


def test_the_errors_are_the_clis_family() -> None:
    from coi import errors

    for name in ("CoiError", "UsageError", "SessionError", "NotFound", "BackendError"):
        assert getattr(coi, name) is getattr(errors, name)
    assert issubclass(coi.NotFound, coi.CoiError)


def test_backend_all_is_pinned() -> None:
    assert set(coi.backend.__all__) == BACKEND_NAMES


def test_importing_coi_loads_nothing_heavy() -> None:
    """`import coi` (and so `coi --version`) must not pull in the SDK, httpx or click."""
    heavy = ("coi.sdk", "httpx", "click")
    code = f"import sys, coi; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""


def test_the_docs_examples_pass_mypy_strict_with_public_names_only(tmp_path: Path) -> None:
    blocks = examples()
    assert len(blocks) >= 5
    for i, code in enumerate(blocks):
        # Only the public surface: no example reaches into coi's modules.
        assert "from coi." not in code and "import coi." not in code, f"example {i}"
        (tmp_path / f"example_{i}.py").write_text(code)
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
