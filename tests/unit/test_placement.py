"""What says a daemon is a cluster, and where an instance is: read from the daemon's own
words (API extension + environment.server_clustered; `location`), never from names."""

from __future__ import annotations

from coi.backend.models import Instance, ServerInfo


def _server(extensions: list[str], clustered: object) -> ServerInfo:
    return ServerInfo.from_api(
        {
            "api_extensions": extensions,
            "environment": {"server": "incus", "server_clustered": clustered},
        }
    )


def test_a_cluster_is_what_the_daemon_says_it_is() -> None:
    assert _server(["clustering"], True).clustered
    # A standalone daemon has the extension and says false.
    assert not _server(["clustering"], False).clustered
    # Without the extension the flag means nothing (an old or odd server): not a cluster.
    assert not _server([], True).clustered
    # A string "true" is not the JSON boolean the API sends.
    assert not _server(["clustering"], "true").clustered


def test_location_off_a_cluster_is_empty() -> None:
    base = {"name": "c1", "status": "Running"}
    assert Instance.from_api({**base, "location": "m2"}).location == "m2"
    assert Instance.from_api({**base, "location": "none"}).location == ""
    assert Instance.from_api(base).location == ""
