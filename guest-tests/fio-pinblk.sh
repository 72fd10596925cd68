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
#   --image-dir DIR put the image in DIR instead of the results directory
#                   (e.g. /dev/shm: an image in memory, which `--aio auto`
#                   serves through a mapping; removed at exit)
#   --loop-device N serve a loop device with N-byte sectors (512 or 4096)
#                   over the 256M image instead of the file (root; the
#                   checksum store beside the backing file; detached at exit),
#                   and check the guest sees N as its logical block size
#
# Exit status 0 only if every fio pass in every guest reported no error, pinblk
# reported no event (fio never changes a buffer under I/O), and
# pinblk stopped cleanly (and, with --loop-device, the guest's logical block
# size is N and `pinblk scrub` of the device passes).
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
LOOP_SECTOR=
IMAGE_DIR=
while [[ $# -gt 0 ]]; do
	case $1 in
	--pinblk) PINBLK=$2; shift 2 ;;
	--queues) QUEUES=$2; shift 2 ;;
	--size) SIZE=$2; shift 2 ;;
	--results) RESULTS=$2; shift 2 ;;
	--verbose) QUIET=; shift ;;
	--pinblk-arg) PINBLK_ARGS+=("$2"); shift 2 ;;
	--loop-device) LOOP_SECTOR=$2; shift 2 ;;
	--image-dir) IMAGE_DIR=$2; shift 2 ;;
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

LOOPDEV=
if [[ -n $LOOP_SECTOR ]]; then
	[[ $LOOP_SECTOR == 512 || $LOOP_SECTOR == 4096 ]] || { echo "fio-pinblk: --loop-device takes 512 or 4096" >&2; exit 2; }
	if [[ $(id -u) -ne 0 || ! -e /dev/loop-control ]] || ! command -v losetup >/dev/null; then
		say "SKIPPED: loop devices unavailable here (need root, /dev/loop-control and losetup)"
		exit 0
	fi
fi
IMAGES=()
detach_loop() {
	[[ -n $LOOPDEV ]] || return 0
	losetup -d "$LOOPDEV" || true
	LOOPDEV=
}

PID=
stop_pinblk() {
	[[ -n $PID ]] || return 0
	kill -TERM "$PID" 2>/dev/null || true
	local st=0
	wait "$PID" || st=$?
	PID=
	return $st
}
trap 'kill -KILL $PID 2>/dev/null || true; [[ -z $PID ]] || wait $PID 2>/dev/null; detach_loop; rm -f "${IMAGES[@]}"' EXIT
# Killed (timeout, Ctrl-C): exit, so that the EXIT trap removes the images
# (--image-dir puts them in /dev/shm, where they would hold memory).
trap 'exit 130' INT TERM HUP

failed=0
summary=()
for nq in $QUEUES; do
	dir=$RESULTS/fio-q$nq
	rm -rf "$dir"; mkdir -p "$dir"
	sock=$dir/pinblk.sock
	image=$dir/disk.img
	image_args=(--size 256M)
	if [[ -n $IMAGE_DIR ]]; then
		image=$IMAGE_DIR/pinblk-fio-q$nq-$$.img
		rm -f "$image" "$image.pinsum"
		IMAGES+=("$image" "$image.pinsum")
	fi
	if [[ -n $LOOP_SECTOR ]]; then
		truncate -s 256M "$dir/disk.img"
		LOOPDEV=$(losetup -f --show --sector-size "$LOOP_SECTOR" "$dir/disk.img")
		image=$LOOPDEV
		image_args=(--checksum-store "$dir/disk.pinsum")
		say "loop device $LOOPDEV: $LOOP_SECTOR-byte sectors over $dir/disk.img"
	fi
	say "=== pinblk with $nq queue(s): $PINBLK serve --image $image ${image_args[*]} --num-queues $nq ${PINBLK_ARGS[*]:-}"
	RUST_LOG=${RUST_LOG:-info} "$PINBLK" serve --socket "$sock" --image "$image" "${image_args[@]}" \
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
	geom=ok
	if [[ -n $LOOP_SECTOR ]]; then
		disk=$(tr -d '\r' <"$dir/console.log" | grep -a '^PINBLK-GUEST-DISK' | tail -1 || true)
		if [[ " $disk " != *" lbs=$LOOP_SECTOR "* ]]; then
			geom="guest logical block size is not $LOOP_SECTOR ($disk)"
		elif ! "$PINBLK" scrub --image "$LOOPDEV" --checksum-store "$dir/disk.pinsum" >"$dir/scrub.log" 2>&1; then
			geom="scrub of $LOOPDEV failed: $(tail -3 "$dir/scrub.log")"
		else
			say "guest: $disk; scrub of $LOOPDEV passed"
		fi
		detach_loop
	fi
	if [[ $rc -ne 0 || $src -ne 0 || ${nevents:-0} -ne 0 || $geom != ok ]]; then
		failed=1
		[[ $geom == ok ]] || say "$geom"
		summary+=("queues=$nq FAIL (fio rc=$rc, pinblk exit $src, ${nevents:-0} report events, geometry: $geom, $((t1 - t0)) s) logs in $dir")
		say "--- last lines of pinblk log ---"; tail -20 "$dir/pinblk.log" >&2
	else
		summary+=("queues=$nq${LOOP_SECTOR:+ loop-device $LOOP_SECTOR-byte sectors} PASS ($((t1 - t0)) s, 0 report events)")
		grep -E 'PINBLK-GUEST-RESULT|IOPS=|err=' "$dir/console.log" | sed 's/^/  guest: /' >&2 || true
	fi
done
say "=== summary ==="
printf '  %s\n' "${summary[@]}" >&2
exit $failed
