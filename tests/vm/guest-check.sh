#!/bin/bash
# guest-check.sh - smoke test of the VM environment; run it in the guest:
#   tests/vm/run-in-vm.sh -- tests/vm/guest-check.sh
# Checks what the vm tests rely on (venv python, netns + veth, nft module
# autoload, BTF incl. module BTF, bpftool) and, if bpftrace is installed on
# the host, that kprobe and fentry/fexit programs attach and fire.
# Prints OK/FAIL lines and timings; exits 1 if anything failed.
set -u
cd "$(dirname "$0")/../.." || exit 1
fail=0
ok()  { echo "OK   $*"; }
bad() { echo "FAIL $*"; fail=1; }
check() { local what=$1; shift; if "$@" >/tmp/check.out 2>&1; then ok "$what"; else bad "$what"; sed 's/^/     /' /tmp/check.out; fi; }
now() { date +%s.%N; }
secs() { local t0; t0=$(now); "$@" >/dev/null 2>&1; local rc=$?; awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.2fs", b-a}'; return $rc; }

echo "== kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) MiB, uptime $(cut -d' ' -f1 /proc/uptime)s"
[[ $(uname -r) == 6.1.* ]] && ok "stock 6.1 kernel" || bad "kernel is $(uname -r), expected 6.1.*"

# --- python
PY=.venv/bin/python
if [ -x "$PY" ]; then
  ok "venv python resolves to $(readlink -f "$PY")"
  echo "     python -c pass: cold $(secs "$PY" -c pass), warm $(secs "$PY" -c pass)"
  echo "     import tracer pyroute2 scapy.all: $(secs "$PY" -c 'import tracer, pyroute2, scapy.all')"
  echo "     pytest --version: $(secs "$PY" -m pytest --version)"
  check "venv imports tracer, pyroute2, pytest" "$PY" -c 'import tracer, pyroute2, pytest'
else
  bad "$PY missing or not executable in the guest"
fi

# --- mounts
for m in /sys/fs/bpf:bpf /sys/kernel/tracing:tracefs /sys/kernel/debug:debugfs /run:tmpfs; do
  grep -q " ${m%%:*} ${m#*:} " /proc/mounts && ok "${m%%:*} is ${m#*:}" || bad "${m%%:*} not mounted as ${m#*:}"
done
ip -o link show lo | grep -q 'UP' && ok "lo is up" || bad "lo is down"

# --- BTF
[ -r /sys/kernel/btf/vmlinux ] && ok "/sys/kernel/btf/vmlinux" || bad "no /sys/kernel/btf/vmlinux"
[ -r "/lib/modules/$(uname -r)/modules.dep" ] && ok "guest modules at /lib/modules/$(uname -r)" || bad "no guest modules"

# --- netns + veth + nft (module autoload: veth, nf_tables, nft_chain_filter...)
ip netns del vmc-a 2>/dev/null; ip netns del vmc-b 2>/dev/null
check "ip netns add (x2)" sh -c 'ip netns add vmc-a && ip netns add vmc-b'
check "veth pair between the namespaces" sh -c '
  ip link add va netns vmc-a type veth peer name vb netns vmc-b &&
  ip -n vmc-a addr add 198.18.0.1/24 dev va && ip -n vmc-a link set va up && ip -n vmc-a link set lo up &&
  ip -n vmc-b addr add 198.18.0.2/24 dev vb && ip -n vmc-b link set vb up && ip -n vmc-b link set lo up &&
  ip netns exec vmc-b busybox ping -c1 -W5 198.18.0.1'
check "nft in netns (input chain, drop rule, counters)" sh -c '
  ip netns exec vmc-a nft "add table inet vmc; add chain inet vmc in { type filter hook input priority 0; }; add rule inet vmc in icmp type echo-request counter drop" &&
  ! ip netns exec vmc-b busybox ping -c1 -W1 198.18.0.1 &&
  ip netns exec vmc-a nft list chain inet vmc in | grep -q "packets 1 "'
check "conntrack in netns (nf_conntrack autoload via ct rule)" sh -c '
  ip netns exec vmc-a nft add rule inet vmc in ct state established accept && lsmod | grep -q "^nf_conntrack "'
check "iptables-legacy in netns (ip_tables autoload)" sh -c '
  ip netns exec vmc-a iptables-legacy -A INPUT -p udp --dport 9 -j DROP && lsmod | grep -q "^ip_tables "'
check "iptables-nft in netns" ip netns exec vmc-b iptables-nft -A OUTPUT -p udp --dport 9 -j DROP
[ -r /sys/kernel/btf/nf_tables ] && ok "module BTF /sys/kernel/btf/nf_tables" || bad "no /sys/kernel/btf/nf_tables"
echo "     modules loaded: $(lsmod | awk 'NR>1{print $1}' | sort | tr '\n' ' ')"
check "bpftool prog" bpftool prog show

# --- kprobe / fentry / fexit (bpftrace 0.17 spells fentry/fexit kfunc/kretfunc)
if command -v bpftrace >/dev/null; then
  ping3="$(command -v ip) netns exec vmc-b $(command -v busybox) ping -c3 -W1 198.18.0.1"
  probe() {  # $1 = name, $2 = program; each map must count > 0
    local t0 out; t0=$(now)
    out=$(bpftrace -e "$2" -c "$ping3" 2>&1)
    if ! echo "$out" | grep -qE '^@[a-z]+: 0$' && echo "$out" | grep -qE '^@[a-z]+: [1-9]'; then
      ok "$1 attached and fired ($(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1fs", b-a}')): $(echo "$out" | grep -E '^@' | tr '\n' ' ')"
    else bad "$1"; echo "$out" | sed 's/^/     /'; fi
  }
  probe "kprobe+kretprobe nf_hook_slow" 'kprobe:nf_hook_slow { @kp = count(); } kretprobe:nf_hook_slow { @krp = count(); }'
  probe "kprobe nft_do_chain (module nf_tables)" 'kprobe:nft_do_chain { @kp = count(); }'
  probe "fentry+fexit nf_hook_slow" 'kfunc:nf_hook_slow { @fentry = count(); } kretfunc:nf_hook_slow { @fexit = count(); }'
  probe "fentry nft_do_chain (module BTF)" 'kfunc:nf_tables:nft_do_chain { @fentry = count(); }'
else
  echo "SKIP kprobe/fentry attach: no bpftrace on the host (apt-get install --no-install-recommends bpftrace)"
fi

ip netns del vmc-a; ip netns del vmc-b
[ $fail = 0 ] && echo "ALL CHECKS PASSED" || echo "SOME CHECKS FAILED"
exit $fail
