"""coi health's judgement of a cluster's members (GET /1.0/cluster/members?recursion=1)."""

from __future__ import annotations

from typing import Any

from coi.health.checks import OK, WARNING, HealthReport, cluster_check, render_text


def _m(name: str, status: str, message: str = "") -> dict[str, Any]:
    return {"server_name": name, "status": status, "message": message, "roles": []}


def test_all_online_is_ok_and_names_them() -> None:
    c = cluster_check([_m("m2", "Online"), _m("m1", "Online"), _m("m3", "Online")])
    assert (c.key, c.status) == ("cluster", OK)
    assert c.message == "3 members online: m1, m2, m3"
    assert [r["status"] for r in c.details["members"]] == ["online"] * 3
    assert "resolution" not in c.details


def test_an_evacuated_member_is_a_warning_with_the_way_back() -> None:
    c = cluster_check(
        [
            _m("m1", "Online"),
            _m("m2", "Online"),
            _m("m3", "Evacuated", "Unavailable due to maintenance"),
        ]
    )
    assert c.status == WARNING
    assert c.message == "m3 evacuated (Unavailable due to maintenance); 2 of 3 members online"
    assert c.details["resolution"] == (
        "'incus cluster restore m3' brings it back. Until then, --target a member online (m1, m2)."
    )


def test_offline_and_unknown_statuses_are_warnings() -> None:
    c = cluster_check([_m("a", "Offline", "No heartbeat for 40s"), _m("b", "Blocked"), {}])
    assert c.status == WARNING
    assert c.message.startswith("? unknown; a offline (No heartbeat for 40s); b blocked;")
    assert c.message.endswith("0 of 3 members online")
    assert c.details["resolution"] == (
        "Check that the member's daemon runs and reaches the others. "
        "Until then, --target a member online."
    )


def test_no_members_listed_is_a_warning() -> None:
    assert cluster_check([]).status == WARNING


def test_the_warning_makes_the_report_degraded_in_text_and_json() -> None:
    report = HealthReport([cluster_check([_m("m1", "Online"), _m("m2", "Offline")])], {})
    assert report.status == "degraded" and report.exit_code == 1
    text = render_text(report)
    assert "[WARN] Cluster           : m2 offline; 1 of 2 members online" in text
    assert "-> Check that the member's daemon runs" in text
    doc = report.to_json()["checks"]["cluster"]
    assert doc["status"] == WARNING
    assert doc["details"]["members"] == [
        {"name": "m1", "status": "online", "message": ""},
        {"name": "m2", "status": "offline", "message": ""},
    ]
