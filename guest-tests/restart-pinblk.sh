#!/usr/bin/env bash
# guest-tests/restart-pinblk.sh -- a running guest survives pinblk's restart
# (issue 16): boot a QEMU (TCG) guest whose vhost-user-blk chardev has
# reconnect=1, run fio with crc32c verification on 2 queues while pinblk's
# reads are slowed (so requests are in flight and complete out of order),
# kill pinblk with SIGKILL --kills times and start it again on the same
# socket, image and checksum store, then hand over once with SIGTERM to a
# fresh pinblk. Passes only if fio exits 0 with no verify error, the guest
# console shows no "is not a head" and no I/O error, and no report of any
# pinblk process has a checksum_failure event.
#
# Usage:
#   guest-tests/restart-pinblk.sh [--pinblk BIN] [--kills N] [--handovers N]
#                                 [--interval SEC] [--size SIZE]
#                                 [--results DIR] [--verbose]
#
#   --pinblk BIN     pinblk binary (default: target/release/pinblk)
#   --kills N        SIGKILL + restart this many times (default 3)
#   --handovers N    then SIGTERM + restart this many times (default 1)
#   --interval SEC   seconds between restarts once fio runs (default 3)
#   --size SIZE      region fio writes then verifies (default 48M)
#   --results DIR    logs (default target/guest-results/restart)
#   --verbose        stream the guest console
#
# It prints how long each restart left the disk without a backend (from the
# signal to the new pinblk's "frontend connected" line) and the largest
# completion latency fio saw (the guest's longest I/O pause).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
PINBLK=$ROOT/target/release/pinblk
KILLS=3
HANDOVERS=1
INTERVAL=3
SIZE=48M
RESULTS=$ROOT/target/guest-results/restart
QUIET=--quiet
while [[ $# -gt 0 ]]; do
	case $1 in
	--pinblk) PINBLK=$2; shift 2 ;;
	--kills) KILLS=$2; shift 2 ;;
	--handovers) HANDOVERS=$2; shift 2 ;;
	--interval) INTERVAL=$2; shift 2 ;;
	--size) SIZE=$2; shift 2 ;;
	--results) RESULTS=$2; shift 2 ;;
	--verbose) QUIET=; shift ;;
	-h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
	*) echo "restart-pinblk: unknown option $1 (see --help)" >&2; exit 2 ;;
	esac
done
[[ -x $PINBLK ]] || { echo "restart-pinblk: no pinblk binary at $PINBLK; run cargo build --release or pass --pinblk" >&2; exit 2; }
say() { printf 'restart-pinblk: %s\n' "$*" >&2; }

"$SCRIPT_DIR/build-guest.sh" "$ROOT/target/guest" >&2
rm -rf "$RESULTS"
mkdir -p "$RESULTS"
SOCK=$RESULTS/pinblk.sock
CONSOLE=$RESULTS/console.log
: >"$CONSOLE"
GEN=0
PID=
FIO_PID=
cleanup() {
	[[ -n $PID ]] && kill -KILL "$PID" 2>/dev/null || true
	[[ -n $FIO_PID ]] && kill -TERM "$FIO_PID" 2>/dev/null || true
}
trap cleanup EXIT

# Starts pinblk generation $GEN on the same socket, image and store.
start_pinblk() {
	GEN=$((GEN + 1))
	RUST_LOG=${RUST_LOG:-info} "$PINBLK" serve --socket "$SOCK" --image "$RESULTS/disk.img" \
		--size 256M --num-queues 2 --report "$RESULTS/report.$GEN.jsonl" \
		--inject-read-delay 30ms --inject-read-probability 0.5 \
		2>"$RESULTS/pinblk.$GEN.log" &
	PID=$!
	for _ in $(seq 100); do
		[[ -S $SOCK ]] && return 0
		sleep 0.05
	done
	cat "$RESULTS/pinblk.$GEN.log" >&2
	say "pinblk generation $GEN did not start"
	exit 1
}

# Seconds (with fraction) from epoch time $1 to the first "frontend
# connected" line of generation $2's log, waiting up to 20 s for it.
reconnect_after() {
	local t0=$1 log=$RESULTS/pinblk.$2.log line ts
	for _ in $(seq 200); do
		line=$(grep -m1 'frontend connected' "$log" || true)
		[[ -n $line ]] && break
		sleep 0.1
	done
	[[ -n $line ]] || { echo "never"; return; }
	ts=$(sed -E 's/^\[([^ ]+) .*/\1/' <<<"$line")
	awk -v a="$t0" -v b="$(date -d "$ts" +%s.%N)" 'BEGIN { printf "%.2f s", b - a }'
}

start_pinblk
"$SCRIPT_DIR/run-fio.sh" --socket "$SOCK" --num-queues 2 --numjobs 2 --iodepth 16 \
	--size "$SIZE" --rw randwrite,randread --reconnect 1 --timeout 400 \
	--log "$CONSOLE" $QUIET >"$RESULTS/run-fio.out" 2>&1 &
FIO_PID=$!

# Wait for fio to start in the guest.
for _ in $(seq 600); do
	grep -a -q '^PINBLK-GUEST-FIO-BEGIN' "$CONSOLE" && break
	kill -0 "$FIO_PID" 2>/dev/null || break
	sleep 0.1
done
grep -a -q '^PINBLK-GUEST-FIO-BEGIN' "$CONSOLE" || { cat "$RESULTS/run-fio.out" >&2; say "fio never started in the guest"; exit 1; }

pauses=()
restart() {
	local sig=$1 t0
	sleep "$INTERVAL"
	if ! kill -0 "$FIO_PID" 2>/dev/null; then
		say "fio finished before restart $((GEN)) ($sig): make --size larger"
		return 1
	fi
	t0=$(date +%s.%N)
	kill -"$sig" "$PID"
	wait "$PID" || true
	start_pinblk
	pauses+=("SIG$sig -> generation $GEN connected after $(reconnect_after "$t0" "$GEN")")
	say "${pauses[-1]}"
}
for _ in $(seq "$KILLS"); do restart KILL; done
for _ in $(seq "$HANDOVERS"); do restart TERM; done

rc=0
wait "$FIO_PID" || rc=$?
FIO_PID=
kill -TERM "$PID" 2>/dev/null || true
wait "$PID" || true
PID=

cat "$RESULTS/run-fio.out"
fail=()
((rc == 0)) || fail+=("run-fio.sh exited $rc")
if grep -a -q 'is not a head' "$CONSOLE"; then fail+=("guest console: \"is not a head\""); fi
if grep -a -q -i 'I/O error' "$CONSOLE"; then fail+=("guest console: I/O error"); fi
failures=$(cat "$RESULTS"/report.*.jsonl 2>/dev/null | grep -c '"kind":"checksum_failure"' || true)
((failures == 0)) || fail+=("$failures checksum_failure event(s) in the reports")
for p in "${pauses[@]}"; do say "restart: $p"; done
maxlat=$(grep -a -E '^ +clat \((nsec|usec|msec)\):' "$CONSOLE" | tr -d '\r' |
	awk '{ unit = ($2 ~ /msec/) ? 1000 : ($2 ~ /nsec/) ? 0.001 : 1; for (i = 1; i <= NF; i++) if ($i ~ /^max=/) { v = $i; k = (v ~ /k,?$/) ? 1000 : (v ~ /m,?$/) ? 1000000 : 1; gsub(/[^0-9.]/, "", v); v *= unit * k; if (v > m) m = v } } END { printf "%.0f ms", m / 1000 }')
say "longest fio completion latency (the guest's longest I/O pause): $maxlat"
if ((${#fail[@]})); then
	for f in "${fail[@]}"; do say "FAIL: $f"; done
	say "logs in $RESULTS"
	exit 1
fi
say "PASS: $KILLS SIGKILL restart(s) and $HANDOVERS SIGTERM handover(s) under fio, 0 checksum_failure"
