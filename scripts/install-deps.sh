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
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
