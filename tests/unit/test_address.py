"""Sandbox addresses: only outside the DHCP pool, only on managed bridges, gateway-aware."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from coi.backend.models import Network
from coi.config.loader import load_config
from coi.errors import BackendError, ConfigError
from coi.network import address
from coi.sessions.sandbox import build_spec


def net(config: dict[str, str], *, type: str = "bridge", managed: bool = True) -> Network:
    return Network("coibr0", type, managed, config, (), "coi bridge")


def test_the_dhcp_pool_is_the_lower_half_of_the_subnet() -> None:
    assert address.dhcp_pool("10.123.45.1/24") == {"ipv4.dhcp.ranges": "10.123.45.2-10.123.45.127"}
    assert address.dhcp_pool("172.29.0.1/16")["ipv4.dhcp.ranges"] == "172.29.0.2-172.29.127.255"
    assert address.dhcp_pool("10.0.0.1/30") == {}  # too small to split


def test_candidates_lie_outside_the_dhcp_pool_and_skip_the_gateway() -> None:
    n = net({"ipv4.address": "10.123.45.1/24", **address.dhcp_pool("10.123.45.1/24")})
    got = address.candidates(n)
    assert got[0] == "10.123.45.128" and got[-1] == "10.123.45.254" and len(got) == 127
    pool = [ipaddress.IPv4Address(f"10.123.45.{i}") for i in range(2, 128)]
    assert not {str(p) for p in pool} & set(got)
    # A gateway placed in the upper half is never handed out.
    high = net({"ipv4.address": "10.9.9.200/24", "ipv4.dhcp.ranges": "10.9.9.1-10.9.9.99"})
    assert "10.9.9.200" not in address.candidates(high)


@pytest.mark.parametrize(
    "n",
    [
        net({"ipv4.address": "10.123.45.1/24"}),  # DHCP owns the whole subnet
        net({"ipv4.address": "none", "ipv4.dhcp.ranges": "10.1.1.2-10.1.1.9"}),
        net({"ipv4.address": "10.1.1.1/24", "ipv4.dhcp.ranges": "garbage"}),
        net(
            {"ipv4.address": "10.1.1.1/24", "ipv4.dhcp.ranges": "10.1.1.2-10.1.1.9"}, managed=False
        ),
        net(
            {"ipv4.address": "10.1.1.1/24", "ipv4.dhcp.ranges": "10.1.1.2-10.1.1.9"}, type="macvlan"
        ),
    ],
)
def test_networks_coi_cannot_safely_pick_on_stay_dhcp_only(n: Network) -> None:
    assert address.candidates(n) == []
    assert address.choose(n) is None


def test_choose_avoids_addresses_already_refused() -> None:
    n = net({"ipv4.address": "10.5.5.1/24", "ipv4.dhcp.ranges": "10.5.5.2-10.5.5.252"})
    assert address.candidates(n) == ["10.5.5.253", "10.5.5.254"]
    got = address.choose(n, avoid={"10.5.5.253"})
    assert got == address.Address("10.5.5.254", 24, "10.5.5.1")
    assert address.choose(n, avoid={"10.5.5.253", "10.5.5.254"}) is None
    assert got.env() == {"ADDR": "10.5.5.254", "PREFIX": "24", "GW": "10.5.5.1"}


def test_a_reused_container_keeps_the_address_its_nic_reserves() -> None:
    n = net({"ipv4.address": "10.5.5.1/24"})
    nic = {"type": "nic", "network": "coibr0", "ipv4.address": "10.5.5.200"}
    assert address.of_nic(n, nic) == address.Address("10.5.5.200", 24, "10.5.5.1")
    assert address.of_nic(n, {"type": "nic"}) is None
    assert address.of_nic(None, nic) is None


def test_only_the_daemons_address_conflict_counts_as_taken() -> None:
    err = BackendError('Failed add validation for device "eth0": IP address "10.1.1.9" '
                       "already defined on another NIC")  # fmt: skip
    assert address.is_taken(err)
    assert not address.is_taken(BackendError("Invalid devices: nope"))


@pytest.mark.parametrize("value", ["-1", "65"])
def test_a_spare_count_out_of_range_is_a_config_error(tmp_path: Path, value: str) -> None:
    f = tmp_path / "config.toml"
    f.write_text(f"[incus]\nspares = {value}\n")
    cfg = load_config(cwd=tmp_path, env={}, files=[f])
    with pytest.raises(ConfigError, match=r"incus\.spares must be between 0 and 64") as err:
        build_spec(cfg, tmp_path, mounts=[], env={})
    assert str(f) in str(err.value.details)


def test_the_boot_config_carries_address_prefix_and_gateway_for_the_image() -> None:
    # images/scripts/coi-image.sh splits it at the space: "ADDR/PREFIX GATEWAY".
    a = address.Address("10.123.45.200", 24, "10.123.45.1")
    assert a.config() == {"environment.COI_ADDRESS": "10.123.45.200/24 10.123.45.1"}
