#!/usr/bin/env bash
# Make DAEMON (incus or lxd) the one running daemon: stop the other, remove the bridges,
# dnsmasq and firewall table it leaves behind (both name their bridges alike, and two
# daemons must never manage the same bridge), then install coi and set DAEMON up
# (scripts/bootstrap.sh: `coi setup --daemon DAEMON`).
#   scripts/switch-daemon.sh incus|lxd [coi setup args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
want="$1"; shift
case "$want" in
    incus) other=lxd; other_dir=/var/lib/lxd; other_bin=lxd ;;
    lxd) other=incus; other_dir=/var/lib/incus; other_bin=incusd ;;
    *) echo "switch-daemon: incus or lxd, not '$want'" >&2; exit 2 ;;
esac

if [ -S "$other_dir/unix.socket" ] && pgrep -x "$other_bin" >/dev/null; then
    # Its managed bridges, read while it still answers.
    bridges="$(curl -s --unix-socket "$other_dir/unix.socket" \
        'http://d/1.0/networks?recursion=1' 2>/dev/null \
        | python3 -c 'import json,sys
for n in json.load(sys.stdin).get("metadata") or []:
    if n.get("managed") and n.get("type") == "bridge": print(n["name"])' || true)"
    echo "== stopping $other (bridges: ${bridges:-none})"
    if [ "$other" = incus ]; then
        timeout 120 incus admin shutdown --timeout 60 || pkill -x incusd || true
    else
        timeout 120 lxd shutdown --timeout 60 || pkill -x lxd || true
    fi
    for _ in $(seq 1 100); do pgrep -x "$other_bin" >/dev/null || break; sleep 0.2; done
    pkill -9 -x "$other_bin" || true
    for b in $bridges; do
        pkill -f "dnsmasq .*--interface=$b( |$)" || true
        ip link del "$b" 2>/dev/null || true
    done
    nft delete table inet "$other" 2>/dev/null || true
    nft delete table bridge "$other" 2>/dev/null || true
fi

# coi itself (once) and `coi setup` for the wanted daemon.
"$ROOT/scripts/bootstrap.sh" --daemon "$want" "$@"
