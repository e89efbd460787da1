#!/bin/bash
# run-in-vm.sh - run a command under Debian's *stock* kernel in a QEMU VM.
#
# Why: the build machines' own kernel (6.18) refuses fentry/fexit and has no
# kprobes; Debian's stock 6.1 kernel has both.  QEMU can only use TCG here
# (/dev/kvm is PVM and cannot run a stock kernel), but with the host's root
# filesystem shared over 9p no disk image is needed and a boot takes ~3 s.
#
#   tests/vm/run-in-vm.sh setup          install packages, fetch the kernel,
#                                        build the initramfs (idempotent)
#   tests/vm/run-in-vm.sh -- CMD ARGS... run CMD in the guest in the current
#                                        directory; exit with its status
#                                        (124 timeout, 125 no status from guest)
#
# Guest: host / read-only (9p) under a tmpfs overlay (writes are discarded),
# proc/sys/dev, /run tmpfs (so /var/run/netns works), bpffs, tracefs, debugfs,
# cgroup2, lo up, no other network (-nic none), the guest kernel's modules
# autoloadable.  CMD's stdout is the script's stdout (byte-exact); its
# stderr, the kernel console and harness messages go to stderr.
#
# Knobs (environment; defaults in brackets):
#   TRACER_VM_DIR      work dir [/var/tmp/tracer-vmtest], ~210 MB per kernel;
#                      not under /run, /proc, /sys, /dev (the guest covers those)
#   TRACER_VM_KPKG     kernel package [what linux-image-amd64 depends on, as
#                      resolved by the last setup], e.g. linux-image-6.1.0-56-amd64
#   TRACER_VM_ENV      names of env vars passed to CMD, besides PATH, CI and
#                      PYTHONPATH which always are [PYTEST_ADDOPTS]
#   TRACER_VM_RW       space-separated absolute host dirs shared read-write at
#                      the same path (results, reports) [none]
#   TRACER_VM_MEM      guest RAM in MiB [1024]
#   TRACER_VM_SMP      vCPUs [min(2, nproc)]
#   TRACER_VM_TIMEOUT  seconds before the VM is killed [900]
#   TRACER_VM_APPEND   extra kernel command line []
set -euo pipefail

# WORK, BOOT_MODS*, the shared halves of the guest init, vm_boot...
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
case $WORK in /run|/run/*|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/var/run|/var/run/*)
  echo "run-in-vm: TRACER_VM_DIR=$WORK is hidden in the guest; pick another" >&2; exit 2;; esac
[[ $WORK == /* ]] || { echo "run-in-vm: TRACER_VM_DIR must be absolute" >&2; exit 2; }

log() { echo "run-in-vm: $*" >&2; }

# Hardware module dirs the guest never needs (saves ~240 MB of 400).
PRUNE='sound drivers/gpu drivers/media drivers/infiniband drivers/usb drivers/iio
  drivers/staging drivers/hwmon drivers/comedi drivers/mtd drivers/isdn
  drivers/bluetooth drivers/mmc drivers/video drivers/net/wireless
  drivers/net/ethernet drivers/net/usb drivers/scsi drivers/ata drivers/md'

# ---------------------------------------------------------------- guest PID 1
# Stays in the initramfs root (chroot, not switch_root) because the kernel runs
# its modprobe helper in PID 1's root: busybox modprobe + /lib/modules there.
write_init() {
  vm_init_root   # ... the overlay root $R; config also gave OUT_TTY, ERR_TTY
  cat <<'EOF'
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs shm $R/dev/shm
mount -t tmpfs run $R/run                 # host's /run is not ours; netns needs it
mount -t bpf bpf $R/sys/fs/bpf
mount -t tracefs tracefs $R/sys/kernel/tracing
mount -t debugfs debugfs $R/sys/kernel/debug
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
# the guest kernel's modules, for the modprobe helper (it runs here)
mkdir -p /lib/modules/$KV
mount --bind /lower$KMODS /lib/modules/$KV
EOF
  vm_init_shares   # modules in the chroot, module tools, TRACER_VM_RW shares
  cat <<'EOF'
cp /xfer/cmd.sh $R/run/tracer-vm-cmd.sh
hostname tracer-vm
ip link set lo up
say "guest ready at $(cut -d' ' -f1 /proc/uptime)s (kernel $KV)"
# CMD's stdout/stderr are ttys only where ours are on the host (isatty()
# decides e.g. pytest's progress display and Python's buffering); else pipes.
o=/dev/ttyS1 e=/dev/ttyS0 cats=
[ -n "$OUT_TTY" ] || { mkfifo /o; cat /o >$o & cats=$!; o=/o; }
[ -n "$ERR_TTY" ] || { mkfifo /e; cat /e >$e & cats="$cats $!"; e=/e; }
env -i HOME=/root TERM=dumb chroot $R /bin/bash /run/tracer-vm-cmd.sh </dev/null >$o 2>$e
rc=$?
# The cats end when the last writer is gone; a daemon CMD left behind must
# not keep the VM up.
[ -z "$cats" ] || { (sleep 5; kill $cats && say "leftover processes hold CMD's output open; cut") 2>/dev/null &
  wait $cats 2>/dev/null; }
echo $rc > /xfer/rc
say "command exited $rc at $(cut -d' ' -f1 /proc/uptime)s"
sync
poweroff -f
EOF
}

# ---------------------------------------------------------------- setup
kpkg_default() {
  apt-cache depends linux-image-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

setup() {
  export DEBIAN_FRONTEND=noninteractive
  local need=() p updated=
  # Check packages, not commands: e.g. /bin/busybox may be the dynamic build
  # (no depmod), and apt would upgrade already installed packages if listed.
  for p in qemu-system-x86 busybox-static xz-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
  done
  if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq && updated=1
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi

  local pkg=${TRACER_VM_KPKG:-$(kpkg_default)}
  if [ -z "$pkg" ] && [ -z "$updated" ]; then apt-get update -qq; pkg=$(kpkg_default); fi
  [ -n "$pkg" ] || { log "cannot resolve linux-image-amd64; set TRACER_VM_KPKG"; return 1; }
  local K=$WORK/$pkg
  mkdir -p "$WORK"

  if [ ! -s "$K/modules.ok" ]; then
    log "fetching $pkg"
    rm -rf "$K"; mkdir -p "$K/deb"
    chmod 777 "$K/deb"   # apt-get download runs as _apt; else a (harmless) warning
    # stale package lists 404: refresh once and retry
    (cd "$K/deb" && { apt-get download -qq "$pkg" || { apt-get update -qq && apt-get download -qq "$pkg"; }; })
    dpkg-deb -x "$K"/deb/*.deb "$K/root"
    rm -rf "$K/deb"
    local kv; kv=$(ls "$K/root/lib/modules")
    (cd "$K/root/lib/modules/$kv/kernel" && rm -rf $PRUNE)
    # The .deb has no modules.dep (made by depmod at install time) and the
    # host has no kmod: busybox depmod writes the files busybox modprobe reads.
    busybox depmod -b "$K/root" "$kv"
    echo "$kv" > "$K/modules.ok"
  fi
  local kv; kv=$(cat "$K/modules.ok")

  # QEMU boots an ELF vmlinux through its PVH note; that skips decompressing
  # the bzImage in the guest, which costs ~3 s under TCG.  The vmlinux is the
  # bzImage's xz payload (the stream carries a BCJ filter, so xz, not busybox).
  if [ ! -s "$K/vmlinux" ]; then
    local z=$K/root/boot/vmlinuz-$kv off
    off=$(LC_ALL=C grep -obUaP -m1 '\xfd7zXZ\x00' "$z" | head -1 | cut -d: -f1)
    # (process substitution: tail's SIGPIPE once xz has its stream is fine)
    xz -dc --single-stream < <(tail -c +$((off + 1)) "$z") > "$K/vmlinux.tmp"
    [ "$(head -c4 "$K/vmlinux.tmp" | tail -c3)" = ELF ] || { log "vmlinux extraction failed"; return 1; }
    mv "$K/vmlinux.tmp" "$K/vmlinux"
  fi

  # Rebuilt when this script or common.sh changes (the init lives in them).
  if vm_stale "$K/initramfs.gz"; then
    local src=$K/initramfs.d M=lib/modules/$kv d
    rm -rf "$src"; mkdir -p "$src"/{bin,proc,sys,dev,$M/kernel}; ln -s bin "$src/sbin"
    cp /bin/busybox "$src/bin/"
    write_init > "$src/init"; chmod +x "$src/init"
    for d in $BOOT_MODS_DIRS; do
      mkdir -p "$src/$M/kernel/$d"; cp -r "$K/root/$M/kernel/$d/." "$src/$M/kernel/$d/"
    done
    cp "$K/root/$M"/modules.* "$src/$M/"
    (cd "$src" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$K/initramfs.tmp"
    mv "$K/initramfs.tmp" "$K/initramfs.gz"   # atomic: a VM may be starting meanwhile
    rm -rf "$src"
  fi
  ln -sfn "$pkg" "$WORK/current"
  log "ready: $K ($kv)"
}

# ---------------------------------------------------------------- run
run() {
  local K=$WORK/${TRACER_VM_KPKG:-current}
  if vm_stale "$K/initramfs.gz"; then setup >&2; fi
  K=$(cd "$K" && pwd -P)
  local kv; kv=$(cat "$K/modules.ok")
  vm_xfer_dir run   # $xfer, global: the EXIT trap needs it
  vm_rw_args || return

  # What the guest's PID 1 and CMD need to know.
  local out_tty= err_tty=
  [ -t 1 ] && out_tty=1
  [ -t 2 ] && err_tty=1
  vm_write_xfer "$kv" "$K" "$@"
  printf 'OUT_TTY=%s\nERR_TTY=%s\n' "$out_tty" "$err_tty" >> "$xfer/config"
  vm_boot "$K" "$K/initramfs.gz" "${TRACER_VM_TIMEOUT:-900}" "${TRACER_VM_MEM:-1024}" "${TRACER_VM_APPEND:-}"
}

case ${1-} in
  setup) setup ;;
  --) shift; (($#)) || { echo "usage: $0 setup | -- CMD ARGS..." >&2; exit 2; }; run "$@" ;;
  *) echo "usage: $0 setup | -- CMD ARGS..." >&2; exit 2 ;;
esac
