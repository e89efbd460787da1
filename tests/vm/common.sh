# common.sh - what run-in-vm.sh and run-systemd-vm.sh share; sourced by both.
#
# Why one file: both runners boot the same kernel the same way (host /
# read-only over 9p under a tmpfs overlay, an exchange dir over 9p, the same
# QEMU command line and exit-status rules) and differ only in what their
# guest PID 1 does once the overlay is mounted. A fix to either half then
# reaches both. The sourcing script defines log() (its own prefix) and sets
# -euo pipefail; the guest inits are changed by editing this file, which
# rebuilds both initramfs images (vm_stale).

WORK=${TRACER_VM_DIR:-/var/tmp/tracer-vmtest}
VM_COMMON=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh

# What the initramfs needs to mount the host root: modules live in these dirs.
BOOT_MODS_DIRS='drivers/virtio net/9p fs/9p fs/netfs fs/fscache fs/overlayfs'
BOOT_MODS='virtio_pci 9pnet_virtio 9p overlay'

# ---------------------------------------------------------------- guest init
# vm_init_root: the start of both guest inits (busybox sh), up to the
# overlay root $R. It defines say/die/p9 and sources the host's config
# (KV, KMODS, RW, ...), whose variables the rest of the init uses.
vm_init_root() {
  sed "s/BOOT_MODS/$BOOT_MODS/" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "tracer-vm: $*" >/dev/ttyS0; }
die() { say "$*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
stty -F /dev/ttyS0 -opost   # stderr/console: no \n -> \r\n
stty -F /dev/ttyS1 -opost   # CMD stdout
modprobe -a BOOT_MODS || die "loading 9p/overlay modules failed"
p9() { mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,"$@"; }
mkdir -p /xfer /lower /upper
p9 rw xfer /xfer || die "no xfer share"
. /xfer/config             # KV, KMODS, RW, ... (from the host)
# cache=loose: the host root is read-only for us, so caching is safe and
# makes Python's many stat/open calls much cheaper.
p9 ro,cache=loose host /lower || die "no host root share"
mount -t tmpfs -o size=50% upper /upper
mkdir -p /upper/u /upper/w
R=/newroot; mkdir -p $R
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay $R \
  || die "overlay mount failed"
EOF
}

# vm_init_shares: what both inits add to $R once its /run is mounted: the
# guest kernel's modules, module tools and the TRACER_VM_RW shares.
vm_init_shares() {
  cat <<'EOF'
# the guest kernel's modules, for CMD (and the modprobe helper, if it runs in $R)
mkdir -p $R/lib/modules/$KV
mount --bind /lower$KMODS $R/lib/modules/$KV
# The kernel runs /sbin/modprobe (initramfs: busybox).  iptables-legacy runs
# it itself, in the new root: the host has no kmod, so give it busybox's.
for t in modprobe lsmod insmod rmmod; do
  [ -e $R/sbin/$t ] || ln -s /bin/busybox $R/sbin/$t
done
i=0
for d in $RW; do
  mkdir -p $R$d && p9 rw rw$i $R$d || die "rw share $d failed"
  i=$((i+1))
done
EOF
}

# vm_stale FILE: FILE (an initramfs) is missing or older than the running
# script or this file, which hold its init.
vm_stale() {
  [ ! -s "$1" ] || [ "$0" -nt "$1" ] || [ "$VM_COMMON" -nt "$1" ]
}

# ---------------------------------------------------------------- host side
# vm_xfer_dir NAME: a fresh exchange dir $WORK/NAME.XXXXXX in the global
# $xfer (the 9p share `xfer`), removed on exit.
vm_xfer_dir() {
  xfer=$(mktemp -d "$WORK/$1.XXXXXX")
  trap 'rm -rf "$xfer"' EXIT
}

# vm_rw_args: the QEMU arguments of the TRACER_VM_RW shares, in the global
# array rwargs. Returns 2 if one is not an existing absolute dir (the list
# is split on blanks, so its paths cannot contain any).
vm_rw_args() {
  local d i=0
  rwargs=()
  for d in ${TRACER_VM_RW:-}; do
    [[ $d == /* && -d $d ]] || { log "TRACER_VM_RW: $d is not an existing absolute dir"; return 2; }
    rwargs+=(-virtfs "local,path=$d,mount_tag=rw$i,security_model=none")
    i=$((i + 1))
  done
}

# vm_write_xfer KV KDIR CMD ARGS...: $xfer/config (KV, KMODS, RW, for the
# guest's PID 1; a caller may append more) and $xfer/cmd.sh (exports the
# passed env vars, cds to our directory and execs CMD).
vm_write_xfer() {
  local kv=$1 K=$2 v
  shift 2
  printf 'KV=%q\nKMODS=%q\nRW=%q\n' "$kv" "$K/root/lib/modules/$kv" "${TRACER_VM_RW:-}" > "$xfer/config"
  {
    for v in PATH CI PYTHONPATH ${TRACER_VM_ENV-PYTEST_ADDOPTS}; do
      [ -n "${!v+set}" ] && printf 'export %s=%q\n' "$v" "${!v}"
    done
    printf 'cd %q || exit 125\nexec' "$PWD"
    printf ' %q' "$@"
    echo
  } > "$xfer/cmd.sh"
}

# vm_boot KDIR INITRD TIMEOUT MEM APPEND: boot KDIR/vmlinux with INITRD,
# the host root, $xfer and the rwargs shares; APPEND ends the kernel command
# line. Returns CMD's status from $xfer/rc; 124 on timeout, 125 if QEMU
# failed or the guest wrote no status.
vm_boot() {
  local K=$1 initrd=$2 limit=$3 mem=$4 append=$5
  # -nodefaults: no VGA, NIC, monitor...  ttyS1 = CMD stdout -> our stdout
  # (stdio: QEMU writes to our very fd, so redirections to files work);
  # ttyS0 = kernel console + init messages + CMD stderr -> a fifo -> our
  # stderr, minus the kernel's "reboot: Power down" line and \r.
  mkfifo "$xfer/con.in" "$xfer/con.out"
  sed -u -e '/^\[ *[0-9.]*\] reboot: Power down/d' -e 's/\r$//' <"$xfer/con.out" >&2 &
  local filter=$! smp=${TRACER_VM_SMP:-$(( $(nproc) < 2 ? $(nproc) : 2 ))} rc=0
  timeout -k 10 "$limit" \
    qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot \
      -accel tcg,thread=multi -cpu max -smp "$smp" -m "$mem" \
      -nic none \
      -chardev pipe,id=con,path="$xfer/con" -serial chardev:con \
      -chardev stdio,id=out -serial chardev:out \
      -kernel "$K/vmlinux" -initrd "$initrd" \
      -append "console=ttyS0 quiet loglevel=3 panic=-1 $append" \
      -virtfs "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap" \
      -virtfs "local,path=$xfer,mount_tag=xfer,security_model=none" \
      "${rwargs[@]}" </dev/null &
  local vm=$!
  # timeout(1) puts itself in its own process group, so Ctrl-C or a CI
  # runner's TERM would not reach QEMU: forward them.
  trap 'kill $vm 2>/dev/null; wait $vm; log interrupted; exit 130' INT TERM
  wait $vm || rc=$?
  trap - INT TERM
  : <>"$xfer/con.out"   # unblocks the filter's open if QEMU never got that far
  wait "$filter" || true
  if ((rc == 124)); then log "timed out after ${limit}s"
  elif ((rc)); then log "qemu failed ($rc)"; rc=125
  elif [ -s "$xfer/rc" ]; then rc=$(cat "$xfer/rc")
  else log "guest reported no exit status"; rc=125
  fi
  return "$rc"
}
