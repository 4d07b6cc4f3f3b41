#!/usr/bin/env bash
# The kernel matrix: runs the probes' kernel tests and an end-to-end check of
# `aperture up` inside Debian's 5.10 and 6.1 kernels (testkit/vm/kernel-vm.sh),
# the oldest kernel Aperture supports and a current LTS.
#
#   testkit/vm/matrix.sh [KVER...]     default: 5.10 6.1
#
# The test binaries and the C test programs are built on the host first (the
# guest has no compiler); inside, the tests use the prebuilt programs
# (APERTURE_TEST_PREBUILT=1). Prints one summary line per kernel and exits
# non-zero if any kernel failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
kernels=("$@"); [ ${#kernels[@]} -gt 0 ] || kernels=(5.10 6.1)
export CARGO_TERM_COLOR=never

target=$(cargo metadata --format-version 1 --no-deps --locked | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
echo "== building the probes' kernel tests and the aperture binary"
# Built with the whole workspace's features, as CI's `cargo build --workspace
# --all-targets` and `cargo test --workspace` build them: selecting one package
# or one binary would resolve the dependencies' features anew (without the
# dev-dependencies' ones) and build a second copy of many of them.
mapfile -t tests < <(cargo test --locked --workspace --tests --no-run --message-format=json 2>/dev/null |
	python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]
            and m["manifest_path"].endswith("/probes/Cargo.toml")):
        print(m["executable"])')
expected=$(ls probes/tests/*.rs | wc -l)
if [ ${#tests[@]} -ne "$expected" ]; then
	echo "matrix: cargo listed ${#tests[@]} probes test binaries, probes/tests has $expected" >&2
	exit 1
fi
cargo build --locked --workspace --all-targets
aperture=$target/debug/aperture
programs=$target/tmp/programs

# The tests build their C programs on first use; run them once on the host
# so every program exists (and the host result is known) before booting.
# CI has just run every test: APERTURE_MATRIX_REUSE_PROGRAMS=1 skips this.
if [ "${APERTURE_MATRIX_REUSE_PROGRAMS:-}" = 1 ] && [ -d "$programs" ]; then
	echo "== reusing the C test programs built by the host's test run"
elif ! (cd probes && for t in "${tests[@]}"; do "$t" --test-threads=1 || exit 1; done) >/dev/null 2>&1; then
	echo "matrix: the probes' tests failed on the host too; booting the guests anyway"
fi
[ -d "$programs" ] || { echo "matrix: no test programs under $programs" >&2; exit 1; }

job=$(mktemp)
trap 'rm -f "$job"' EXIT
{
	echo 'export APERTURE_TEST_PREBUILT=1 RUST_BACKTRACE=1'
	echo 'fail=0'
	for t in "${tests[@]}"; do
		echo "echo \"== $(basename "$t")\"; $t --test-threads=1 || fail=1"
	done
	echo "echo '== end to end'; sh $PWD/testkit/vm/guest-e2e.sh $aperture $programs || fail=1"
	echo 'exit $fail'
} >"$job"

summary=()
status=0
for k in "${kernels[@]}"; do
	echo "== kernel $k"
	log=$(mktemp)
	if testkit/vm/kernel-vm.sh "$k" "$job" "${tests[@]}" "$aperture" "$programs" "$PWD/testkit/vm/guest-e2e.sh" | tee "$log"; then
		result=passed
	else
		result=FAILED; status=1
	fi
	passed=$(grep -o 'test result: [a-zA-Z]*\. [0-9]* passed' "$log" | awk '{s += $4} END {print s + 0}')
	failed=$(grep -o '[0-9]* failed;' "$log" | awk '{s += $1} END {print s + 0}')
	summary+=("kernel $k: $result ($passed tests passed, $failed failed, end to end: $(grep -q 'e2e: FAILED' "$log" && echo failed || echo ok))")
	rm -f "$log"
done
printf '%s\n' "${summary[@]}"
exit $status
