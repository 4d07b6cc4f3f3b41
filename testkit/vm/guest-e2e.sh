#!/bin/sh
# End-to-end check inside a kernel-matrix guest: `aperture up` in all modes,
# the known test programs, and queries through the API. Waits are bounded in
# attempts, never judged by time: a guest CPU is several times slower than
# the host. Arguments: the aperture binary and the directory of the built
# test programs. Exits non-zero naming the first check that failed.
set -u
aperture=$1 programs=$2
token=kernel-matrix-token
api=http://127.0.0.1:9090/api/v1
query() { wget -q -O - --header "Authorization: Bearer $token" "$api/$1" 2>/dev/null; }
# Polls `query $1` until its output contains $2, up to $3 attempts 2 s apart.
wait_for() {
	i=0
	while [ "$i" -lt "$3" ]; do
		if query "$1" | grep -q "$2"; then return 0; fi
		i=$((i + 1)); sleep 2
	done
	echo "e2e: FAILED: $1 never showed $2"; return 1
}

# No overhead budget: an emulated guest CPU is several times slower than the
# host, the agent measures itself above 1% of it, and the budget would raise
# the lock threshold past the test program's waits.
APERTURE_AUTH_TOKEN=$token APERTURE_MODE=all APERTURE_FREQ=99 \
	"$aperture" up --no-budget --data-dir /tmp/aperture-data >/tmp/up.log 2>&1 &
up=$!
i=0
until wget -q -O /dev/null http://127.0.0.1:9090/healthz 2>/dev/null; do
	i=$((i + 1))
	if [ "$i" -ge 120 ] || ! kill -0 "$up" 2>/dev/null; then
		echo "e2e: FAILED: aperture up did not become healthy"; cat /tmp/up.log; exit 1
	fi
	sleep 1
done
echo "e2e: aperture up is healthy"

# The burner runs until the end, so the agent's start-up does not matter; its
# samples showing up also tell that every probe is attached, so the
# short-lived programs start only then.
(echo g; sleep 900) | "$programs/cpu_burner" 900 >/dev/null &
burner=$!
fail=0
wait_for "top?mode=cpu" leaf_burn 150 && echo "e2e: cpu: leaf_burn is in the top functions" || fail=1
(echo g; sleep 900) | "$programs/syscall_count" 20000 >/dev/null &
syscalls=$!
# Contends for tens of seconds (4 threads, 1 ms each per round): a new
# process is walked by frame pointers until the agent has read its mappings,
# which a slow guest can take longer than the default 100 rounds last.
(echo g; sleep 900) | "$programs/mutex_contend" 5000 >/dev/null &
mutex=$!
wait_for "syscalls?pid=$syscalls" getppid 90 && echo "e2e: syscall: getppid is counted" || fail=1
wait_for "locks?pid=$mutex" contend_worker 90 && echo "e2e: lock: the contending thread has waits" || fail=1
kill "$burner" "$syscalls" "$mutex" 2>/dev/null
pkill -f "sleep 900" 2>/dev/null
if [ "$fail" != 0 ]; then
	echo "e2e: aperture up's log:"; tail -50 /tmp/up.log
fi
kill -INT "$up"; wait "$up"
echo "e2e: aperture up exited with $?"
exit "$fail"
