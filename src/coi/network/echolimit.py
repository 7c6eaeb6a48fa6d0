"""The host's own rule that bounds the rate of ICMP echo out of every coi policy bridge."""

from __future__ import annotations

import os
import shutil
import subprocess

from coi.errors import SetupError

TABLE = "coi"
# Bumped when the rules change, so `coi setup` replaces an older table.
VERSION = "coi v1"
# Per sandbox address; a burst first, so `ping` works as people expect.
RATE = "10/second burst 20 packets"

# The daemon's ACLs have no rate limit. This table lives beside the daemon's own (a packet
# any table drops is dropped) and matches every policy bridge by name ("coi-*"); open mode's
# bridge (`coibr0`) is not one of them.
ECHO_RULE = (
    'iifname "coi-*" icmp type echo-request '
    f"add @echo4 {{ ip saddr limit rate over {RATE} }} counter drop"
)
RULES = f"""\
table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
	comment "{VERSION}: ICMP echo out of sandboxes, rate-limited per sandbox"
	set echo4 {{
		type ipv4_addr
		size 65535
		flags dynamic,timeout
		timeout 1m
	}}
	chain forward {{
		type filter hook forward priority filter; policy accept;
		{ECHO_RULE}
	}}
}}
"""


def _nft() -> str | None:
    # sbin is not on a regular user's PATH.
    return shutil.which("nft") or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None
    )


def installed() -> bool | None:
    """Whether the table is in place (None: cannot tell, e.g. not root or no nft)."""
    nft = _nft()
    if nft is None:
        return None
    res = subprocess.run(
        [nft, "list", "table", "inet", TABLE], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        return None if "Operation not permitted" in res.stderr else False
    return VERSION in res.stdout


def install() -> None:
    """Put the table in place, replacing an older one in one transaction."""
    nft = _nft()
    if nft is None:
        raise SetupError("nft is not installed", resolution="Install nftables: 'coi setup'.")
    res = subprocess.run([nft, "-f", "-"], input=RULES, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SetupError("could not load coi's echo rate limit", details=res.stderr.strip())
