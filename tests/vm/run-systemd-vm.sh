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
WORK=${TRACER_VM_DIR:-/var/tmp/tracer-vmtest}
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
  cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "tracer-vm: $*" >/dev/ttyS0; }
die() { say "$*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
stty -F /dev/ttyS0 -opost
stty -F /dev/ttyS1 -opost
modprobe -a virtio_pci 9pnet_virtio 9p overlay || die "loading 9p/overlay modules failed"
p9() { mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,"$@"; }
mkdir -p /xfer /lower /upper
p9 rw xfer /xfer || die "no xfer share"
. /xfer/config
p9 ro,cache=loose host /lower || die "no host root share"
mount -t tmpfs -o size=50% upper /upper
mkdir -p /upper/u /upper/w
R=/newroot; mkdir -p $R
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay $R || die "overlay mount failed"
# systemd mounts proc, sys, dev, cgroup2, bpffs... itself; /run must be
# ours (the host's is not), and it carries the exchange dir.
mount -t tmpfs -o mode=0755,nosuid,nodev run $R/run
mkdir -p $R/run/tracer-vm
mount --bind /xfer $R/run/tracer-vm
umount /xfer
mkdir -p $R/lib/modules/$KV
mount --bind /lower$KMODS $R/lib/modules/$KV
for t in modprobe lsmod insmod rmmod; do
  [ -e $R/sbin/$t ] || ln -s /bin/busybox $R/sbin/$t
done
i=0
for d in $RW; do
  mkdir -p $R$d && p9 rw rw$i $R$d || die "rw share $d failed"
  i=$((i+1))
done
cp -a $R/run/tracer-vm/units/. $R/etc/systemd/system/
echo tracer-vm > $R/etc/hostname
# The build machine's / is a container's (/.dockerenv): systemd would take
# itself for a container's init and ignore the kernel command line.
rm -f $R/.dockerenv
# The host's /tmp and /var/tmp (hundreds of MB over 9p) would keep
# systemd-tmpfiles busy for minutes: the guest gets empty ones.
mount -t tmpfs -o mode=1777 tmp $R/tmp
mount -t tmpfs -o mode=1777 vartmp $R/var/tmp
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
if [ ! -s "$initrd" ] || [ "$0" -nt "$initrd" ] || [ "$K/initramfs.gz" -nt "$initrd" ]; then
  src=$(mktemp -d); write_init > "$src/init"; chmod +x "$src/init"
  (cd "$src" && echo init | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$src/init.cpio.gz"
  cat "$K/initramfs.gz" "$src/init.cpio.gz" > "$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  rm -rf "$src"
fi

xfer=$(mktemp -d "$WORK/sdrun.XXXXXX")
trap 'rm -rf "$xfer"' EXIT
d= rwargs=() i=0
for d in ${TRACER_VM_RW:-}; do
  [[ $d == /* && -d $d ]] || { log "TRACER_VM_RW: $d is not an existing absolute dir"; exit 2; }
  rwargs+=(-virtfs "local,path=$d,mount_tag=rw$i,security_model=none")
  i=$((i + 1))
done
printf 'KV=%q\nKMODS=%q\nRW=%q\n' "$kv" "$K/root/lib/modules/$kv" "${TRACER_VM_RW:-}" > "$xfer/config"
{
  for v in PATH CI PYTHONPATH ${TRACER_VM_ENV-PYTEST_ADDOPTS}; do
    [ -n "${!v+set}" ] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  printf 'cd %q || exit 125\nexec' "$PWD"
  printf ' %q' "$@"
  echo
} > "$xfer/cmd.sh"
unit_files "$xfer/units"

mkfifo "$xfer/con.in" "$xfer/con.out"
sed -u -e '/^\[ *[0-9.]*\] reboot: Power down/d' -e 's/\r$//' <"$xfer/con.out" >&2 &
filter=$! smp=${TRACER_VM_SMP:-$(( $(nproc) < 2 ? $(nproc) : 2 ))} rc=0
timeout -k 10 "${TRACER_VM_TIMEOUT:-600}" \
  qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot \
    -accel tcg,thread=multi -cpu max -smp "$smp" -m "${TRACER_VM_MEM:-1536}" \
    -nic none \
    -chardev pipe,id=con,path="$xfer/con" -serial chardev:con \
    -chardev stdio,id=out -serial chardev:out \
    -kernel "$K/vmlinux" -initrd "$initrd" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 systemd.unit=tracer-vm.target fstab=no systemd.show_status=false systemd.log_level=warning systemd.firstboot=off ${TRACER_VM_APPEND:-}" \
    -virtfs "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$xfer,mount_tag=xfer,security_model=none" \
    "${rwargs[@]}" </dev/null &
vm=$!
trap 'kill $vm 2>/dev/null; wait $vm; log interrupted; exit 130' INT TERM
wait $vm || rc=$?
trap - INT TERM
: <>"$xfer/con.out"
wait "$filter" || true
if ((rc == 124)); then log "timed out after ${TRACER_VM_TIMEOUT:-600}s"
elif ((rc)); then log "qemu failed ($rc)"; rc=125
elif [ -s "$xfer/rc" ]; then rc=$(cat "$xfer/rc")
else log "guest reported no exit status"; rc=125
fi
exit "$rc"
