"""Where `coi build` takes its base from, decided without touching any network."""

from __future__ import annotations

import pytest

from coi.errors import UsageError
from coi.images.base import BASE_ALIAS, choose_base


def _choose(
    setting: str, *, server: str = "", answers: bool = False, local: frozenset[str] = frozenset()
):
    asked: list[str] = []

    def server_answers(url: str) -> bool:
        asked.append(url)
        return answers

    choice = choose_base(
        setting,
        server=server,
        server_alias="debian/12",
        mirror="http://mirror/debian",
        local_exists=lambda a: a in local,
        server_answers=server_answers,
    )
    return choice, asked


def test_auto_without_a_server_bootstraps_and_never_asks_the_network() -> None:
    choice, asked = _choose("auto")
    assert (choice.kind, choice.source, asked) == ("debootstrap", "http://mirror/debian", [])
    assert choice.reason == "no image server configured"
    cached, _ = _choose("auto", local=frozenset({BASE_ALIAS}))
    assert (cached.kind, cached.source) == ("local", BASE_ALIAS)


def test_auto_with_a_server_uses_it_when_it_answers_else_falls_back() -> None:
    choice, asked = _choose("auto", server="https://images.example", answers=True)
    assert choice.kind == "server" and asked == ["https://images.example"]
    choice, _ = _choose("auto", server="https://images.example", answers=False)
    assert choice.kind == "debootstrap" and "does not answer" in choice.reason


def test_explicit_settings() -> None:
    assert _choose("debootstrap", server="https://x", answers=True)[0].kind == "debootstrap"
    assert _choose("my-base", local=frozenset({"my-base"}))[0].source == "my-base"
    with pytest.raises(UsageError, match="base image 'nope' not found"):
        _choose("nope")
    with pytest.raises(UsageError, match=r"no build\.image_server"):
        _choose("server")
    with pytest.raises(UsageError, match="does not answer"):
        _choose("server", server="https://x", answers=False)
