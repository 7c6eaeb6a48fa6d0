"""Which daemon `coi setup` installs and from where: apt's answers read, the plan chosen."""

from __future__ import annotations

from pathlib import Path

import pytest

from coi.errors import SetupError
from coi.host import daemon as dmn

BOOKWORM = {"ID": "debian", "VERSION_CODENAME": "bookworm"}
TRIXIE = {"ID": "debian", "VERSION_CODENAME": "trixie"}

POLICY_BACKPORTS = """\
incus-base:
  Installed: (none)
  Candidate: 6.0.4-2+deb13u7~bpo12+1
  Version table:
     6.0.4-2+deb13u7~bpo12+1 100
        100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages
"""
POLICY_TWO = """\
lxd:
  Installed: 5.0.2-5+deb12u6
  Candidate: 5.0.2-5+deb12u6
  Version table:
 *** 5.0.2-5+deb12u6 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
     5.0.3-1~bpo12+1 100
        100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages
"""
POLICY_NONE = """\
incus:
  Installed: (none)
  Candidate: (none)
  Version table:
"""


def test_candidate_is_read_from_apt_policy() -> None:
    assert dmn.candidate_from_policy(POLICY_BACKPORTS) == "6.0.4-2+deb13u7~bpo12+1"
    assert dmn.candidate_from_policy(POLICY_NONE) is None
    assert dmn.candidate_from_policy("") is None


def test_a_suites_version_is_read_even_below_the_candidate() -> None:
    assert dmn.candidate_from_policy(POLICY_TWO, release="bookworm-backports") == "5.0.3-1~bpo12+1"
    assert dmn.candidate_from_policy(POLICY_TWO, release="bookworm") == "5.0.2-5+deb12u6"
    assert dmn.candidate_from_policy(POLICY_TWO, release="trixie") is None


def fake_apt(available: dict[tuple[str, str | None], str]):  # type: ignore[no-untyped-def]
    def candidate(package: str, *, release: str | None = None) -> str | None:
        return available.get((package, release))

    return candidate


def test_debian_12_enables_backports_for_incus() -> None:
    plan = dmn.plan_install(
        release_info=BOOKWORM,
        candidate=fake_apt({("lxd", None): "5.0.2"}),
        suite_enabled=lambda s: False,
    )
    assert plan.kind is dmn.INCUS and plan.enable_backports
    assert plan.packages == ("incus-base", "incus-client")
    assert plan.release == "bookworm-backports"


def test_debian_12_with_backports_already_there_installs_from_them() -> None:
    plan = dmn.plan_install(
        release_info=BOOKWORM,
        candidate=fake_apt({("incus-base", "bookworm-backports"): "6.0.4"}),
        suite_enabled=lambda s: True,
    )
    assert (plan.kind, plan.release, plan.enable_backports) == (
        dmn.INCUS,
        "bookworm-backports",
        False,
    )


def test_no_backports_means_lxd_on_debian_12_and_a_clear_error_when_incus_is_demanded() -> None:
    apt = fake_apt({("lxd", None): "5.0.2"})
    plan = dmn.plan_install(
        backports=False, release_info=BOOKWORM, candidate=apt, suite_enabled=lambda s: False
    )
    assert plan.kind is dmn.LXD and plan.notes
    with pytest.raises(SetupError, match="Incus cannot be installed") as err:
        dmn.plan_install(
            "incus",
            backports=False,
            release_info=BOOKWORM,
            candidate=apt,
            suite_enabled=lambda s: False,
        )
    assert "--no-backports" in (err.value.details or "")


def test_a_distribution_with_incus_uses_its_own_and_lxd_only_when_asked() -> None:
    apt = fake_apt({("incus-base", None): "6.0.4", ("lxd", None): "5.21"})
    plan = dmn.plan_install(release_info=TRIXIE, candidate=apt, suite_enabled=lambda s: False)
    assert (plan.kind, plan.release, plan.enable_backports) == (dmn.INCUS, None, False)
    plan = dmn.plan_install("lxd", release_info=TRIXIE, candidate=apt)
    assert plan.kind is dmn.LXD and not plan.notes
    whole = fake_apt({("incus", None): "6.0.0"})
    assert dmn.plan_install(release_info=TRIXIE, candidate=whole).packages == ("incus",)


def test_nothing_installable_is_an_error_naming_what_to_do() -> None:
    with pytest.raises(SetupError, match="neither incus nor lxd") as err:
        dmn.plan_install(
            release_info={"ID": "fedora"}, candidate=fake_apt({}), suite_enabled=lambda s: False
        )
    assert "linuxcontainers.org" in (err.value.resolution or "")


def test_sources_are_read_for_the_suite_and_the_mirror(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n"
    )
    legacy = tmp_path / "old.list"
    legacy.write_text(
        "# deb http://x/debian bookworm-backports main\ndeb-src http://y/debian sid main\n"
    )
    assert dmn.debian_mirror([legacy, deb822]) == "http://mirror.example/debian"
    assert not dmn.has_suite("bookworm-backports", [legacy, deb822])
    legacy.write_text("deb http://x/debian bookworm-backports main\n")
    assert dmn.has_suite("bookworm-backports", [legacy, deb822])
    assert dmn.debian_mirror([]) == dmn.DEFAULT_MIRROR
    text = dmn.backports_source("bookworm-backports", "http://mirror.example/debian")
    assert "Suites: bookworm-backports\n" in text and dmn.DEBIAN_KEYRING in text


def test_os_release_is_parsed(tmp_path: Path) -> None:
    f = tmp_path / "os-release"
    f.write_text(
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_CODENAME=bookworm\n'
    )
    assert dmn.os_release(f)["VERSION_CODENAME"] == "bookworm"
    assert dmn.os_release(tmp_path / "missing") == {}


def test_subids_get_root_entries_and_lose_a_second_range_for_root() -> None:
    from coi.host.provision import subid_lines

    debian_after_lxd = [
        "coitest:100000:65536",
        "root:1000000:1000000000",
        "root:1500:1",
        "_lxd:1001000000:10000001",
        "root:1001000000:10000001",
    ]
    lines, added, removed = subid_lines(debian_after_lxd, [0, 1500])
    assert added == ["root:0:1"] and removed == ["root:1001000000:10000001"]
    assert lines == [*debian_after_lxd[:4], "root:0:1"]
    assert subid_lines(lines, [0, 1500]) == (lines, [], [])
