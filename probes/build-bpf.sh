#!/bin/sh
# Builds Aperture's BPF objects from probes/bpf/*.bpf.c into probes/bpf/obj/.
#
#   probes/build-bpf.sh           rebuild the committed objects
#   probes/build-bpf.sh --check   rebuild into a temporary directory and fail
#                                 (exit 1) if any object differs from the
#                                 committed one
#
# Needs clang-19 and llvm-19 (llvm-strip-19) and libbpf's headers
# (Debian: apt-get install clang-19 llvm-19 libbpf-dev). The output is
# reproducible byte for byte: sources are compiled from a fixed relative path,
# -ffile-prefix-map/-fdebug-compilation-dir remove the checkout location, and
# the DWARF sections are stripped (the BTF that CO-RE and the loader need
# stays). `cargo build` never runs this script: the objects are committed.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
CLANG=${CLANG:-clang-19}
STRIP=${LLVM_STRIP:-llvm-strip-19}
SOURCES="cpu lock syscall"

mode=build
case "${1:-}" in
	"") ;;
	--check) mode=check ;;
	*) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

for tool in "$CLANG" "$STRIP"; do
	command -v "$tool" >/dev/null 2>&1 || {
		echo "build-bpf: $tool not found; install it with: apt-get install clang-19 llvm-19 libbpf-dev" >&2
		exit 2
	}
done
[ -f /usr/include/bpf/bpf_helpers.h ] || {
	echo "build-bpf: /usr/include/bpf/bpf_helpers.h not found; install it with: apt-get install libbpf-dev" >&2
	exit 2
}

if [ "$mode" = check ]; then
	out=$(mktemp -d)
	trap 'rm -rf "$out"' EXIT
else
	out="$HERE/bpf/obj"
	mkdir -p "$out"
fi

cd "$HERE/bpf"
for name in $SOURCES; do
	"$CLANG" -O2 -g -target bpf -mcpu=v3 -D__TARGET_ARCH_x86 \
		-Wall -Werror \
		-ffile-prefix-map="$HERE/bpf"=. -fdebug-compilation-dir=. -fno-ident \
		-I. -c "$name.bpf.c" -o "$out/$name.bpf.o.tmp"
	"$STRIP" -g "$out/$name.bpf.o.tmp" -o "$out/$name.bpf.o"
	rm -f "$out/$name.bpf.o.tmp"
done

if [ "$mode" = check ]; then
	status=0
	for name in $SOURCES; do
		if ! cmp -s "$out/$name.bpf.o" "$HERE/bpf/obj/$name.bpf.o"; then
			echo "build-bpf: probes/bpf/obj/$name.bpf.o differs from a rebuild of probes/bpf/$name.bpf.c; run probes/build-bpf.sh and commit the result" >&2
			status=1
		fi
	done
	[ "$status" = 0 ] && echo "build-bpf: committed objects match the sources"
	exit "$status"
fi
