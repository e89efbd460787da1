#!/bin/bash
# run-systemd-vm.sh - run a command under real systemd (PID 1) in the stock-kernel VM.
#
#   tests/vm/run-systemd-vm.sh -- CMD ARGS...
#
# Why: the build machines' PID 1 is not systemd, so `systemctl` cannot manage
# units there; this boots Debian's stock kernel as run-in-vm.sh does (host /
# read-only over 9p under a tmpfs overlay, so /etc, /var and /run are
# writable and thrown away), but PID 1 switches root into the overlay and
# execs /lib/systemd/systemd. systemd starts `tracer-vm.target`, a minimal
# target whose one service runs CMD (in the current directory, with PATH, CI
# and PYTHONPATH passed) and powers the VM off when CMD ends. CMD is a
# service of that systemd, so it can use systemctl, journalctl and
# systemd-analyze on live units.
#
# CMD's stdout is our stdout; its stderr, the kernel console and `tracer-vm:`
# lines (boot time, CMD's exit) go to stderr. Exit status: CMD's; 124 on
# timeout, 125 if the VM failed or reported no status.
#
# Uses the kernel, modules and initramfs that `run-in-vm.sh setup` prepares
# (run here first, idempotent) and the same knobs: TRACER_VM_DIR, TRACER_VM_MEM (default 1536 here),
# TRACER_VM_SMP, TRACER_VM_TIMEOUT (default 600 s here), TRACER_VM_APPEND,
# TRACER_VM_ENV, TRACER_VM_RW. Boot to CMD takes 12-25 s of guest time (about
# 7 s of it systemd); a `systemctl start` of a unit with default dependencies
# pulls in sysinit.target and basic.target, about 20 s more the first time.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"   # WORK, the shared halves of the guest init, vm_boot...
log() { echo "run-systemd-vm: $*" >&2; }

[ "${1-}" = -- ] && shift || { echo "usage: $0 -- CMD ARGS..." >&2; exit 2; }
(($#)) || { echo "usage: $0 -- CMD ARGS..." >&2; exit 2; }
[ -x /lib/systemd/systemd ] || { log "systemd is not installed on this host (apt-get install systemd)"; exit 2; }

"$HERE/run-in-vm.sh" setup >/dev/null
K=$(cd "$WORK/${TRACER_VM_KPKG:-current}" && pwd -P)
kv=$(cat "$K/modules.ok")

# ---------------------------------------------------------------- the init
# The harness's initramfs with this /init appended: the kernel unpacks
# concatenated archives in order, so ours replaces its /init. It mounts
# what run-in-vm.sh's init mounts, then hands PID 1 to systemd.
write_init() {
  vm_init_root   # ... the overlay root $R
  cat <<'EOF'
# systemd mounts proc, sys, dev, cgroup2, bpffs... itself; /run must be
# ours (the host's is not), and it carries the exchange dir.
mount -t tmpfs -o mode=0755,nosuid,nodev run $R/run
mkdir -p $R/run/tracer-vm
mount --bind /xfer $R/run/tracer-vm
umount /xfer
EOF
  vm_init_shares   # modules, module tools, TRACER_VM_RW shares
  cat <<'EOF'
cp -a $R/run/tracer-vm/units/. $R/etc/systemd/system/
echo tracer-vm > $R/etc/hostname
# The build machine's / is a container's (/.dockerenv): systemd would take
# itself for a container's init and ignore the kernel command line.
rm -f $R/.dockerenv
# The host's /tmp and /var/tmp (hundreds of MB over 9p) would keep
# systemd-tmpfiles busy for minutes: the guest gets empty ones. A checkout
# under them (a CI clone in /tmp) is moved over first, as the overlay shows
# it (writable, the writes thrown away), so the command can still cd there.
case "$HOSTCWD" in
  /tmp/*|/var/tmp/*)
    mkdir -p /stash
    mount --bind "$R$HOSTCWD" /stash || die "cannot keep $HOSTCWD" ;;
esac
mount -t tmpfs -o mode=1777 tmp $R/tmp
mount -t tmpfs -o mode=1777 vartmp $R/var/tmp
case "$HOSTCWD" in
  /tmp/*|/var/tmp/*)
    mkdir -p "$R$HOSTCWD"
    mount --move /stash "$R$HOSTCWD" || die "cannot show $HOSTCWD in the guest" ;;
esac
say "switching to systemd at $(cut -d' ' -f1 /proc/uptime)s (kernel $KV)"
# PID 1 chroots (switch_root), and the kernel's threads share its fs: the
# modprobe helper then runs /sbin/modprobe of the new root (busybox).
exec switch_root $R /lib/systemd/systemd --unit=tracer-vm.target --show-status=false --log-level=warning
EOF
}

unit_files() {
  local d=$1
  mkdir -p "$d"
  cat > "$d/tracer-vm.target" <<'EOF'
[Unit]
Description=tracer VM: one command under systemd
Requires=tracer-vm-cmd.service
After=tracer-vm-cmd.service
AllowIsolate=yes
EOF
  # The host's timers and boot-time services that a test VM never needs.
  local u
  for u in timers.target systemd-timesyncd.service systemd-pstore.service; do
    ln -sf /dev/null "$d/$u"
  done
  # Only the journal before CMD: every other unit starts when CMD (or a
  # unit it starts) needs it.
  cat > "$d/tracer-vm-cmd.service" <<'EOF'
[Unit]
Description=tracer VM command
DefaultDependencies=no
Wants=systemd-journald.socket
After=systemd-journald.socket
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStartPre=/bin/sh -c 'echo "tracer-vm: command starts at $(cut -d" " -f1 /proc/uptime)s" >/dev/ttyS0'
ExecStart=/bin/bash /run/tracer-vm/cmd.sh
ExecStopPost=/bin/sh -c 'case "$EXIT_STATUS" in ""|*[!0-9]*) rc=125;; *) rc=$EXIT_STATUS;; esac; echo "tracer-vm: command exited $rc ($EXIT_CODE) at $(cut -d" " -f1 /proc/uptime)s" >/dev/ttyS0; echo $rc > /run/tracer-vm/rc; sync'
TimeoutStartSec=infinity
StandardInput=null
StandardOutput=file:/dev/ttyS1
StandardError=file:/dev/ttyS0
EOF
}

initrd=$WORK/initramfs-systemd.gz
if vm_stale "$initrd" || [ "$K/initramfs.gz" -nt "$initrd" ]; then
  src=$(mktemp -d); write_init > "$src/init"; chmod +x "$src/init"
  (cd "$src" && echo init | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$src/init.cpio.gz"
  cat "$K/initramfs.gz" "$src/init.cpio.gz" > "$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  rm -rf "$src"
fi

vm_xfer_dir sdrun
vm_rw_args || exit
vm_write_xfer "$kv" "$K" "$@"
printf 'HOSTCWD=%q\n' "$PWD" >> "$xfer/config"
unit_files "$xfer/units"
# (under set -e a failure exits with vm_boot's status, CMD's)
vm_boot "$K" "$initrd" "${TRACER_VM_TIMEOUT:-600}" "${TRACER_VM_MEM:-1536}" \
  "systemd.unit=tracer-vm.target fstab=no systemd.show_status=false systemd.log_level=warning systemd.firstboot=off ${TRACER_VM_APPEND:-}"
