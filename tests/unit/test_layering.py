"""The shape of the code: `cli` -> domain packages -> `backend`, with no cycle between packages."""

from __future__ import annotations

import ast
from collections import defaultdict

from tests.conftest import ROOT

SRC = ROOT / "src" / "coi"
# What the REST client may use besides itself: it knows nothing of sessions. `fsio` is a
# leaf of the standard library's (atomic writes), for the remotes' certificates and pins.
BACKEND_MAY_USE = {"backend", "errors", "fsio"}


def _imports() -> dict[str, set[tuple[str, str]]]:
    """package -> {(package it imports, from which file)} for coi's own imports."""
    out: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC)
        pkg = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "coi":
                names = [f"coi.{a.name}" for a in node.names]  # from coi import labels
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "coi" and len(parts) > 1 and parts[1] != pkg:
                    out[pkg].add((parts[1], str(rel)))
    return out


def test_the_backend_knows_nothing_of_the_layers_above_it() -> None:
    wrong = sorted((f, tgt) for tgt, f in _imports()["backend"] if tgt not in BACKEND_MAY_USE)
    assert wrong == []


def test_only_the_entry_point_imports_the_cli() -> None:
    wrong = sorted(
        (f, pkg)
        for pkg, deps in _imports().items()
        for tgt, f in deps
        if tgt == "cli" and pkg != "__main__"
    )
    assert wrong == []


def test_no_two_packages_import_each_other_even_through_others() -> None:
    deps = {pkg: {tgt for tgt, _ in found} for pkg, found in _imports().items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            cur = todo.pop()
            for nxt in deps.get(cur, ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = sorted(pkg for pkg in deps if reaches(pkg, pkg))
    assert cycles == [], {p: sorted(deps[p]) for p in cycles}


# Leaves: anything may use them, they use nothing of coi's.
LEAVES = {"errors", "labels", "fsio", "checkpoint", "units"}
# The layers above the domain packages: only they (and the package's lazy public names) may
# use the SDK, and nothing but the entry point uses them.
ABOVE = {"cli", "mcp", "sdk"}


def test_leaves_use_nothing_of_coi() -> None:
    imports = _imports()
    assert {leaf: sorted(imports[leaf]) for leaf in LEAVES if imports[leaf]} == {}


def test_the_domain_never_reaches_up_to_the_sdk_mcp_or_cli() -> None:
    wrong = sorted(
        (f, tgt)
        for pkg, deps in _imports().items()
        for tgt, f in deps
        if tgt in ABOVE and pkg not in ABOVE | {"__init__", "__main__"}
    )
    assert wrong == []


def test_images_do_not_use_sessions() -> None:
    """Building an image knows nothing of sessions (the labels both write are in labels.py)."""
    assert sorted(f for tgt, f in _imports()["images"] if tgt == "sessions") == []


# The REST client's sub-APIs (`client.instances`, `client.exec`, ...): the CLI parses flags,
# calls a domain function and renders what it returns; it never talks to the daemon itself.
DAEMON_APIS = {"instances", "files", "exec", "images", "networks", "projects", "storage"}
# (file under src/coi/cli, expression) allowed to read one anyway, each with its reason.
# None: a name that only looks like one is renamed instead (Config.files_read).
DAEMON_API_ALLOWED: set[tuple[str, str]] = set()


def test_the_cli_never_talks_to_the_daemon_itself() -> None:
    """No `<anything>.instances` (nor .files, .exec, .images, .networks, .projects,
    .storage) under src/coi/cli: the name alone counts, whatever object it is read from."""
    cli = SRC / "cli"
    wrong = sorted(
        f"src/coi/cli/{rel}:{node.lineno}: {expr}"
        for f in cli.rglob("*.py")
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f)))
        if isinstance(node, ast.Attribute) and node.attr in DAEMON_APIS
        for rel, expr in [(str(f.relative_to(cli)), ast.unparse(node))]
        if (rel, expr) not in DAEMON_API_ALLOWED
    )
    assert wrong == [], "move these daemon calls into a domain module:\n" + "\n".join(wrong)
