#!/usr/bin/env bash
# guest-tests/fio-pinblk.sh -- the guest test of pinblk: for each queue count,
# start `pinblk serve` on a fresh sparse image, boot a QEMU (TCG) guest against
# it, run direct-I/O fio with crc32c verification on /dev/vda (randwrite, then
# randread verifying what was written), stop pinblk with SIGTERM and print its
# final counters.
#
# Usage:
#   guest-tests/fio-pinblk.sh [--pinblk BIN] [--queues "1 2"] [--size 32M]
#                             [--results DIR] [--verbose] [-- run-fio args...]
#
#   --pinblk BIN    pinblk binary (default: target/release/pinblk, else target/debug/pinblk)
#   --queues LIST   queue counts to test, one guest boot each (default "1 2")
#   --size SIZE     region fio writes then verifies (default 32M)
#   --results DIR   where logs go (default target/guest-results); kept on failure
#   --verbose       stream the guest console
#   --pinblk-arg A  extra argument for pinblk serve (repeatable)
#
# Exit status 0 only if every fio pass in every guest reported no error, pinblk
# reported no event (fio never changes a buffer under I/O), and
# pinblk stopped cleanly.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
PINBLK=
QUEUES="1 2"
SIZE=32M
RESULTS=$ROOT/target/guest-results
QUIET=--quiet
PINBLK_ARGS=()
EXTRA=()
while [[ $# -gt 0 ]]; do
	case $1 in
	--pinblk) PINBLK=$2; shift 2 ;;
	--queues) QUEUES=$2; shift 2 ;;
	--size) SIZE=$2; shift 2 ;;
	--results) RESULTS=$2; shift 2 ;;
	--verbose) QUIET=; shift ;;
	--pinblk-arg) PINBLK_ARGS+=("$2"); shift 2 ;;
	--) shift; EXTRA=("$@"); break ;;
	-h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
	*) echo "fio-pinblk: unknown option $1 (see --help)" >&2; exit 2 ;;
	esac
done
if [[ -z $PINBLK ]]; then
	for c in "$ROOT/target/release/pinblk" "$ROOT/target/debug/pinblk"; do
		[[ -x $c ]] && { PINBLK=$c; break; }
	done
fi
[[ -x $PINBLK ]] || { echo "fio-pinblk: no pinblk binary; run cargo build first or pass --pinblk" >&2; exit 2; }

say() { printf 'fio-pinblk: %s\n' "$*" >&2; }
mkdir -p "$RESULTS"
"$SCRIPT_DIR/build-guest.sh" "$ROOT/target/guest" >&2

PID=
stop_pinblk() {
	[[ -n $PID ]] || return 0
	kill -TERM "$PID" 2>/dev/null || true
	local st=0
	wait "$PID" || st=$?
	PID=
	return $st
}
trap 'kill -KILL $PID 2>/dev/null || true' EXIT

failed=0
summary=()
for nq in $QUEUES; do
	dir=$RESULTS/fio-q$nq
	rm -rf "$dir"; mkdir -p "$dir"
	sock=$dir/pinblk.sock
	say "=== pinblk with $nq queue(s): $PINBLK serve --image $dir/disk.img --size 256M --num-queues $nq ${PINBLK_ARGS[*]:-}"
	RUST_LOG=${RUST_LOG:-info} "$PINBLK" serve --socket "$sock" --image "$dir/disk.img" --size 256M \
		--num-queues "$nq" --report "$dir/report.jsonl" "${PINBLK_ARGS[@]}" 2>"$dir/pinblk.log" &
	PID=$!
	for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
	[[ -S $sock ]] || { cat "$dir/pinblk.log" >&2; say "pinblk did not start"; exit 1; }
	t0=$(date +%s)
	rc=0
	"$SCRIPT_DIR/run-fio.sh" --socket "$sock" --num-queues "$nq" --size "$SIZE" \
		--log "$dir/console.log" $QUIET "${EXTRA[@]}" || rc=$?
	t1=$(date +%s)
	src=0
	stop_pinblk || src=$?
	counters=$(grep -o 'stopped; counters: .*' "$dir/pinblk.log" | tail -1 || true)
	say "pinblk: ${counters:-no final counters (exit $src)}"
	if [[ -z $QUIET ]]; then
		say "--- pinblk report $dir/report.jsonl ---"
		"$PINBLK" report "$dir/report.jsonl" >&2 || true
	fi
	# fio never touches a buffer in flight: any report event is a pinblk bug.
	nevents=$(grep -c . "$dir/report.jsonl" 2>/dev/null || true)
	if [[ ${nevents:-0} -ne 0 ]]; then
		say "unexpected report events from a fio workload:"; "$PINBLK" report "$dir/report.jsonl" >&2 || true
	fi
	if [[ $rc -ne 0 || $src -ne 0 || ${nevents:-0} -ne 0 ]]; then
		failed=1
		summary+=("queues=$nq FAIL (fio rc=$rc, pinblk exit $src, ${nevents:-0} report events, $((t1 - t0)) s) logs in $dir")
		say "--- last lines of pinblk log ---"; tail -20 "$dir/pinblk.log" >&2
	else
		summary+=("queues=$nq PASS ($((t1 - t0)) s, 0 report events)")
		grep -E 'PINBLK-GUEST-RESULT|IOPS=|err=' "$dir/console.log" | sed 's/^/  guest: /' >&2 || true
	fi
done
say "=== summary ==="
printf '  %s\n' "${summary[@]}" >&2
exit $failed
