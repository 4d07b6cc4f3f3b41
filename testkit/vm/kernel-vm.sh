#!/usr/bin/env bash
# Boots one of Debian's kernels under qemu in software emulation and runs a
# script inside, with the given files copied in at the same absolute paths.
#
#   testkit/vm/kernel-vm.sh KVER SCRIPT [PATH...]
#
#   KVER    5.10 (Debian 11's kernel) or 6.1 (Debian 12's kernel)
#   SCRIPT  a /bin/sh script run inside the guest, with busybox's tools;
#           /proc, /sys, /dev, tracefs, debugfs and lo are set up; the
#           root file system (with /tmp) is the initramfs, in memory, so
#           files copied in under /tmp stay visible. Its exit code becomes this script's exit code.
#   PATH    files or directories copied into the guest at the same absolute
#           path; for every executable among them, the shared libraries
#           ldd names are copied too, with their detached debug files
#           when the host has them. Executables are copied without their
#           DWARF sections (symbol tables stay) to keep the guest small.
#
# The kernel package is fetched once with apt, from the same Debian mirror
# this machine uses, into ${APERTURE_VM_CACHE:-/var/cache/aperture-vm}. No
# KVM is needed (nor available on nested machines): the guest runs under TCG,
# several times slower than the host, so what runs inside must not depend
# on timing.
#
# Environment: APERTURE_VM_MEM (MiB, default 3072), APERTURE_VM_TIMEOUT
# (seconds, default 1500), APERTURE_VM_CPUS (default 2).
set -euo pipefail

usage() { echo "usage: $0 5.10|6.1 SCRIPT [PATH...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
kver=$1; script=$2; shift 2
[ -f "$script" ] || { echo "kernel-vm: no script at $script" >&2; exit 2; }
cache=${APERTURE_VM_CACHE:-/var/cache/aperture-vm}
export DEBIAN_FRONTEND=noninteractive

for tool in qemu-system-x86_64 busybox cpio; do
	command -v "$tool" >/dev/null && continue
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends qemu-system-x86 busybox-static cpio >/dev/null
	break
done

case $kver in
	5.10) suite=bullseye; pattern='^linux-image-5\.10\.0-[0-9]+-amd64$' ;;
	6.1) suite=bookworm; pattern='^linux-image-6\.1\.0-[0-9]+-amd64$' ;;
	*) echo "kernel-vm: unknown kernel $kver: use 5.10 or 6.1" >&2; exit 2 ;;
esac

fetch_kernel() {
	local apt=$cache/apt-$suite mirror security sources
	mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
	sources=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null || true)
	mirror=$(grep -oE 'https?://[^ ]+/debian/?( |$)' <<<"$sources" | head -1 | tr -d ' ' || true)
	security=$(grep -oE 'https?://[^ ]+/debian-security/?( |$)' <<<"$sources" | head -1 | tr -d ' ' || true)
	if [ -z "$mirror" ]; then
		echo "kernel-vm: this machine's apt sources name no Debian mirror to fetch the $kver kernel from" >&2
		exit 2
	fi
	{
		echo "deb [trusted=yes] $mirror $suite main"
		[ -z "$security" ] || echo "deb [trusted=yes] $security $suite-security main"
	} >"$apt/sources.list"
	local opts=(-o Dir::Etc::sourcelist="$apt/sources.list" -o Dir::Etc::sourceparts=-
		-o Dir::State::lists="$apt/lists" -o Dir::Cache="$apt/cache")
	apt-get "${opts[@]}" update -qq
	local pkg
	pkg=$(apt-cache "${opts[@]}" search --names-only "$pattern" | awk '{print $1}' | sort -V | tail -1)
	[ -n "$pkg" ] || { echo "kernel-vm: no package matches $pattern in $suite" >&2; exit 2; }
	(cd "$cache" && apt-get "${opts[@]}" download "$pkg" >/dev/null &&
		rm -rf "$kver" && mkdir -p "$kver" && dpkg-deb -x "$pkg"_*.deb "$kver" && rm -f "$pkg"_*.deb)
}

mkdir -p "$cache"
vmlinuz=$(ls "$cache/$kver"/boot/vmlinuz-* 2>/dev/null | head -1 || true)
if [ -z "$vmlinuz" ]; then
	fetch_kernel
	vmlinuz=$(ls "$cache/$kver"/boot/vmlinuz-* | head -1)
fi

root=$(mktemp -d)
trap 'rm -rf "$root" "$root.cpio.gz"' EXIT
mkdir -p "$root"/{bin,proc,sys,dev,tmp,etc,root,run}
cp "$(command -v busybox)" "$root/bin/"
for applet in $(busybox --list); do [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"; done

# A library's detached debug file (Debian's *-dbg packages, by build id), so
# that symbols stripped from the library still resolve inside the guest.
copy_debug_file() {
	local id debug
	id=$(readelf -n "$1" 2>/dev/null | sed -n 's/.*Build ID: \([0-9a-f]*\).*/\1/p' | head -1)
	[ -n "$id" ] || return 0
	debug=/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug
	[ -e "$debug" ] && [ ! -e "$root$debug" ] || return 0
	mkdir -p "$root$(dirname "$debug")"
	cp -L "$debug" "$root$debug"
}
copy_libs() {
	local lib
	for lib in $(ldd "$1" 2>/dev/null | grep -o '/[^ ]*' || true); do
		[ -e "$root$lib" ] && continue
		mkdir -p "$root$(dirname "$lib")"
		cp -L "$lib" "$root$lib"
		copy_debug_file "$lib"
	done
}
copy_in() {
	local src=$1 dst=$root$1
	mkdir -p "$(dirname "$dst")"
	if [ -d "$src" ]; then
		cp -a "$src" "$dst"
		find "$dst" -type f -perm -u+x | while read -r f; do copy_libs "$f"; done
	elif [ -x "$src" ] && head -c 4 "$src" | grep -q ELF; then
		objcopy --strip-debug "$src" "$dst" 2>/dev/null || cp "$src" "$dst"
		copy_libs "$src"
	else
		cp -a "$src" "$dst"
	fi
}
for path in "$@"; do
	[ -e "$path" ] || { echo "kernel-vm: no file at $path" >&2; exit 2; }
	case $path in /*) ;; *) echo "kernel-vm: $path must be an absolute path" >&2; exit 2 ;; esac
	copy_in "$path"
done
echo "127.0.0.1 localhost" >"$root/etc/hosts"
echo "root:x:0:0::/root:/bin/sh" >"$root/etc/passwd"
cp "$script" "$root/job"

cat >"$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tracefs none /sys/kernel/tracing 2>/dev/null
mount -t debugfs none /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ip link set lo up
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
echo "kernel-vm: kernel $(uname -r)"
cd /tmp && /bin/sh /job
echo "kernel-vm: job exit $?"
poweroff -f
INIT
chmod +x "$root/init" "$root/job"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$root.cpio.gz"

# loglevel=5: the kernel's warnings reach the console with their stack
# traces; softlockup_panic=1: a CPU stuck in the kernel ends the guest at
# once (panic=-1 reboots, -no-reboot stops qemu) instead of at the timeout,
# after every CPU's backtrace (softlockup_all_cpu_backtrace=1) and every
# task's state (panic_print=1), so the log shows what it was stuck on.
# watchdog_thresh=60: "stuck" means 120 s. An emulated guest on a busy host
# can spend 20 s and more servicing its own timer interrupts (both CPUs
# seen in hrtimer_interrupt on the way back to user space) and recover; a
# lockup that lasts still stops the guest long before the timeout.
log=$(mktemp)
set +e
timeout "${APERTURE_VM_TIMEOUT:-1500}" qemu-system-x86_64 -accel tcg,thread=multi -cpu max \
	-smp "${APERTURE_VM_CPUS:-2}" -m "${APERTURE_VM_MEM:-3072}" -nographic -no-reboot \
	-kernel "$vmlinuz" -initrd "$root.cpio.gz" \
	-append "console=ttyS0 panic=-1 loglevel=5 softlockup_panic=1 watchdog_thresh=60 softlockup_all_cpu_backtrace=1 panic_print=1 rdinit=/init" </dev/null |
	sed -u 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\r//g' | tee "$log"
qemu=${PIPESTATUS[0]}
set -e
code=$(sed -n 's/^kernel-vm: job exit \([0-9]*\)$/\1/p' "$log" | tail -1)
rm -f "$log"
if [ -z "$code" ]; then
	echo "kernel-vm: the guest stopped before the job finished (qemu exit $qemu; 124 is the timeout)" >&2
	exit 3
fi
exit "$code"
