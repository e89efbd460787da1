#!/bin/bash
# Installs the Debian packages tracer needs to build and run, only those
# missing, so a repeated `make` costs a dpkg query and nothing more.
#   scripts/install-deps.sh           build + run + tests
#   scripts/install-deps.sh vm        also what the stock-kernel VM tests need
#   scripts/install-deps.sh bench     also the tools the benchmarks compare against
set -euo pipefail

packages=(
  clang llvm bpftool libbpf-dev libbpf1   # build the CO-RE object; load it
  nftables libnftables1 iptables conntrack iproute2 util-linux   # firewalls, netns, nsenter
  python3 python3-venv python3-dev gcc make
  rsyslog rsyslog-openssl prometheus systemd logrotate   # the service tests: a real rsyslog (TLS too), promtool, systemd-analyze, journald, logrotate
  firewalld   # the diagnosis tests run the real firewalld in a lab namespace (never started on the host)
)
if [ "${1:-}" = vm ]; then
  packages+=(qemu-system-x86 busybox-static xz-utils)
fi
if [ "${1:-}" = bench ]; then
  packages+=(bpftrace iperf3)   # the observers and the accepted-traffic load of tests/bench
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: these packages are missing and need root: ${missing[*]}" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# firewalld is only for the tests (a private instance in a lab namespace): when this script
# installs it, it must not start or enable it on the host, which would change the host's firewall.
new_firewalld=0
if printf '%s\n' "${missing[@]}" | grep -qx firewalld; then
  new_firewalld=1
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
fi
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
if [ "$new_firewalld" = 1 ] && command -v systemctl >/dev/null; then
  systemctl disable firewalld >/dev/null 2>&1 || true
fi
