#!/usr/bin/env bash
# guest-tests/demo.sh -- what pinblk is for, in one guest boot: a torn write
# caught and explained under `--policy passthrough`, then the same workload
# bounced with nothing torn, and a picture of the run.
#
# Usage:
#   guest-tests/demo.sh [--pinblk BIN] [--results DIR] [--blocks N] [--verbose]
#
# One QEMU guest (TCG, chardev reconnect=1) runs the same workload twice:
#   - dio-scribble: per 4 KiB block, an O_DIRECT write of a buffer of 0xff
#     while a second thread overwrites the buffer with 0x00 (the write's
#     buffer changes while the write is in flight: xfstests generic/761),
#     then every block is read back;
#   - overlap-read: reads into one buffer that a write is writing from, all
#     in flight at once (a pin conflict, rule R1).
# Phase 1 is served by `pinblk serve --policy passthrough`: pinblk writes
# what the guest's memory holds, zero-copy, and reports each torn write
# (R3), each read-back block that fails its checksum (R4) and each
# conflict. The guest then waits (polling the disk's serial number, which
# pinblk answers) while the host stops pinblk, scrubs the image, and starts
# it again on the same socket, image and checksum store with `--policy
# bounce --bounce always` (every write copied to a private buffer before it
# is checksummed and written); QEMU reconnects. Phase 2 runs the same
# workload on the same blocks. Both phases append to one report; the end is
# a side-by-side summary, the report and `pinblk plot` of it.
#
# Options:
#   --pinblk BIN   pinblk binary (default target/release/pinblk)
#   --results DIR  where the report, picture and logs go (default target/demo)
#   --blocks N     blocks the scribbler writes per phase (default 1024)
#   --verbose      stream the guest console
#
# Exit status: 0 when phase 1 caught torn writes and checksum failures and
# phase 2 had none; 1 otherwise; 2 on setup errors.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
PINBLK=$ROOT/target/release/pinblk
RESULTS=$ROOT/target/demo
BLOCKS=1024
QUIET=--quiet
while [[ $# -gt 0 ]]; do
	case $1 in
	--pinblk) PINBLK=$2; shift 2 ;;
	--results) RESULTS=$2; shift 2 ;;
	--blocks) BLOCKS=$2; shift 2 ;;
	--verbose) QUIET=; shift ;;
	-h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
	*) echo "demo: unknown option $1 (see --help)" >&2; exit 2 ;;
	esac
done
[[ -x $PINBLK ]] || { echo "demo: no pinblk binary at $PINBLK; run cargo build --release or pass --pinblk" >&2; exit 2; }
[[ $BLOCKS =~ ^[0-9]+$ && $BLOCKS -ge 16 ]] || { echo "demo: --blocks takes a number >= 16" >&2; exit 2; }
say() { printf 'demo: %s\n' "$*" >&2; }

"$SCRIPT_DIR/build-guest.sh" "$ROOT/target/guest" >&2
rm -rf "$RESULTS"
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
SOCK=$RESULTS/pinblk.sock
IMAGE=$RESULTS/disk.img
REPORT=$RESULTS/report.jsonl
PICTURE=$RESULTS/run.svg
CONSOLE=$RESULTS/console.log
: >"$CONSOLE"
PID=
GUEST_PID=
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
	[[ -z $PID ]] || kill -KILL "$PID" 2>/dev/null || true
	[[ -z $GUEST_PID ]] || kill -TERM "$GUEST_PID" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MiB=$((1024 * 1024))
SCR_OFF=$((64 * MiB))
OVL_OFF=$((128 * MiB))
OVL_ROUNDS=50
# The two phases differ only in pinblk's policy; the guest tells them apart
# by the serial number pinblk answers (GET_ID is sent to the backend on
# every read of /sys/block/vda/serial).
SERIAL1=demo-passthrough
SERIAL2=demo-bounce-always

# start_pinblk PHASE SERIAL POLICY_ARGS...
start_pinblk() {
	local phase=$1 serial=$2
	shift 2
	RUST_LOG=${RUST_LOG:-info} "$PINBLK" serve --socket "$SOCK" --image "$IMAGE" --size 256M \
		--num-queues 2 --serial "$serial" --report "$REPORT" \
		--inject-read-delay 20ms --inject-read-probability 0.5 "$@" \
		2>"$RESULTS/pinblk.$phase.log" &
	PID=$!
	for _ in $(seq 100); do
		[[ -S $SOCK ]] && return 0
		sleep 0.05
	done
	cat "$RESULTS/pinblk.$phase.log" >&2
	say "pinblk ($phase) did not start"
	exit 2
}
stop_pinblk() {
	kill -TERM "$PID"
	local st=0
	wait "$PID" || st=$?
	PID=
	((st == 0)) || { say "pinblk exited with status $st; see $RESULTS/pinblk.*.log"; exit 1; }
}

# The guest's command: phase 1, wait for the second pinblk, phase 2.
workload() {
	cat <<EOF
dio-scribble --offset $SCR_OFF --blocks $BLOCKS --readback || rc=1
overlap-read --offset $OVL_OFF --blocks 64 --rounds $OVL_ROUNDS --verify || rc=1
EOF
}
{
	echo 'rc=0'
	echo "echo PINBLK-DEMO-PHASE phase=1 serial=\$(cat /sys/block/vda/serial)"
	workload
	echo 'echo PINBLK-DEMO-PHASE-DONE phase=1'
	echo "i=0; while [ \"\$(cat /sys/block/vda/serial)\" != $SERIAL2 ]; do i=\$((i + 1)); [ \$i -lt 600 ] || exit 3; sleep 0.1; done"
	echo "echo PINBLK-DEMO-PHASE phase=2 serial=\$(cat /sys/block/vda/serial)"
	workload
	echo 'echo PINBLK-DEMO-PHASE-DONE phase=2'
	# shellcheck disable=SC2016  # expanded in the guest
	echo 'exit $rc'
} >"$RESULTS/guest-cmd"

T0=$(date +%s.%N)
say "phase 1: pinblk --policy passthrough (zero-copy, conflicts and torn writes only reported)"
start_pinblk passthrough "$SERIAL1" --policy passthrough
"$SCRIPT_DIR/run-fio.sh" --socket "$SOCK" --num-queues 2 --reconnect 1 --timeout 170 \
	--cmd "$(cat "$RESULTS/guest-cmd")" --log "$CONSOLE" $QUIET >"$RESULTS/run-fio.out" 2>&1 &
GUEST_PID=$!

for _ in $(seq 1500); do
	grep -a -q '^PINBLK-DEMO-PHASE-DONE phase=1' "$CONSOLE" && break
	kill -0 "$GUEST_PID" 2>/dev/null || break
	sleep 0.1
done
if ! grep -a -q '^PINBLK-DEMO-PHASE-DONE phase=1' "$CONSOLE"; then
	cat "$RESULTS/run-fio.out" >&2
	say "the guest never finished phase 1; console: $CONSOLE"
	exit 1
fi
stop_pinblk
scrub1=0
"$PINBLK" scrub --image "$IMAGE" >"$RESULTS/scrub.1.out" 2>/dev/null || scrub1=$?
say "phase 2: same socket, image and store, pinblk --policy bounce --bounce always (every write copied before it is checksummed and written)"
start_pinblk bounce-always "$SERIAL2" --policy bounce --bounce always

rc=0
wait "$GUEST_PID" || rc=$?
GUEST_PID=
stop_pinblk
scrub2=0
"$PINBLK" scrub --image "$IMAGE" >"$RESULTS/scrub.2.out" 2>/dev/null || scrub2=$?
plot_rc=0
"$PINBLK" plot "$REPORT" -o "$PICTURE" 2>"$RESULTS/plot.err" || plot_rc=$?
T1=$(date +%s.%N)

# ---- summary ----------------------------------------------------------------
tr -d '\r' <"$CONSOLE" >"$RESULTS/console.txt"
# count KIND POLICY [ACTION] -> number of report lines with those fields
count() {
	local n
	n=$(grep -F "\"kind\":\"$1\"" "$REPORT" 2>/dev/null | grep -F "\"policy\":\"$2\"" |
		{ if [[ -n ${3:-} ]]; then grep -F "\"action\":\"$3\""; else cat; fi; } | grep -c . || true)
	echo "${n:-0}"
}
# prog PHASE NAME KEY -> KEY=value of program NAME's line in PHASE (1 or 2)
prog() {
	awk -v phase="$1" -v name="$2" -v key="$3" '
		/^PINBLK-DEMO-PHASE / { p++ }
		p == phase && /^PINBLK-PROG / && index($0, " name=" name " ") {
			for (i = 1; i <= NF; i++) if (index($i, key "=") == 1) { v = substr($i, length(key) + 2) }
		}
		END { print (v == "" ? "?" : v) }' "$RESULTS/console.txt"
}
scrub_failing() { sed -n 's/.* \([0-9]*\) failing.*/\1/p' "$1" | tail -1; }
torn1=$(count torn_write passthrough) torn2=$(count torn_write bounce)
csum1=$(count checksum_failure passthrough) csum2=$(count checksum_failure bounce)
conf1=$(count conflict passthrough passthrough) conf2=$(count conflict bounce bounce)
conf1_all=$(count conflict passthrough) conf2_all=$(count conflict bounce)
eio1=$(($(prog 1 dio-scribble write_eio) + $(prog 1 dio-scribble read_eio))) || eio1='?'
eio2=$(($(prog 2 dio-scribble write_eio) + $(prog 2 dio-scribble read_eio))) || eio2='?'
# One torn write whose later bytes reached the disk, and the read of that
# block that failed its checksum, as `pinblk report --human` prints them.
human=$("$PINBLK" report --human "$REPORT" 2>/dev/null || true)
torn_line=$(grep -m1 '^pinblk: torn write .*disk holds the later bytes' <<<"$human" || grep -m1 '^pinblk: torn write' <<<"$human" || true)
blk=$(sed -n 's/^[^(]*(block \([0-9]*\)).*/\1/p' <<<"$torn_line")
csum_line=
[[ -z $blk ]] || csum_line=$(grep -m1 "^pinblk: Checksum failed at sector [^ ]* (block $blk)" <<<"$human" || true)

verdict=PASS
reasons=()
((rc == 0)) || reasons+=("the guest's programs or run-fio.sh failed (exit $rc; $RESULTS/run-fio.out)")
((torn1 > 0 && csum1 > 0)) || reasons+=("phase 1 (passthrough) caught no torn write or no checksum failure")
((conf1 > 0 && conf1 == conf1_all && conf2 > 0 && conf2 == conf2_all)) || reasons+=("conflicts: phase 1 $conf1 of $conf1_all let through, phase 2 $conf2 of $conf2_all bounced (want all, and some)")
((torn2 == 0 && csum2 == 0)) || reasons+=("phase 2 (bounce always) has torn writes or checksum failures")
((scrub1 == 1 && scrub2 == 0)) || reasons+=("scrub after phase 1 exited $scrub1 (want 1), after phase 2 $scrub2 (want 0)")
((plot_rc == 0)) || reasons+=("pinblk plot failed: $(head -3 "$RESULTS/plot.err")")
((${#reasons[@]} == 0)) || verdict=FAIL

{
	echo
	echo "================ pinblk demo: a write whose buffer changes while it is in flight ================"
	echo "The guest writes 4 KiB blocks of 0xff with O_DIRECT while a second thread overwrites"
	echo "the buffer with 0x00 ($BLOCKS blocks), then reads them back; and reads into a buffer a"
	echo "write is writing from ($OVL_ROUNDS rounds). Same guest, same blocks, two policies:"
	echo
	printf '  %-52s %18s   %s\n' "" "--policy" "--policy bounce"
	printf '  %-52s %18s   %s\n' "" "passthrough" "--bounce always"
	printf '  %-52s %18s   %s\n' "torn writes caught (R3: buffer changed in flight)" "$torn1" "$torn2"
	printf '  %-52s %18s   %s\n' "blocks failing their checksum on read (R4)" "$csum1" "$csum2"
	printf '  %-52s %18s   %s\n' "pin conflicts (R1: read into a buffer being written)" "$conf1 let through" "$conf2 bounced"
	printf '  %-52s %18s   %s\n' "I/O errors seen by the guest" "$eio1" "$eio2"
	printf '  %-52s %18s   %s\n' "pinblk scrub of the image afterwards" "$(scrub_failing "$RESULTS/scrub.1.out") failing" "$(scrub_failing "$RESULTS/scrub.2.out") failing"
	echo
	echo "  passthrough writes straight from guest memory: what reaches the disk is whatever the"
	echo "  buffer held at that instant, so pinblk's checksum (taken at submission) disagrees with"
	echo "  the disk (what btrfs or dm-integrity report as a csum error under QEMU cache=none)."
	echo "  --bounce always copies each write first: the disk gets one consistent copy. (The default,"
	echo "  --policy bounce, copies only requests that conflict with a pin, like the R1 reads above;"
	echo "  a buffer changed by the guest CPU conflicts with no pin.)"
	if [[ -n $torn_line ]]; then
		echo
		echo "  Block $blk in the report (pinblk report --human): the write, then its read-back:"
		fold -s -w 100 <<<"$torn_line" | sed '1s/^/    /; 2,$s/^/      /'
		[[ -z $csum_line ]] || fold -s -w 100 <<<"$csum_line" | sed '1s/^/    /; 2,$s/^/      /'
		# CRC32C of 4096 bytes of 0xff and of 0x00.
		[[ $torn_line != *"csum 0x98f94189 expected csum 0x25c1fe13"* ]] || {
			echo "    (\"expected csum\": of the bytes the write was submitted with, 0xff; \"csum\": of what"
			echo "    the disk holds: the 0x00 the guest wrote into the buffer while the write was in flight)"
		}
	fi
	echo
	echo "  report:  $REPORT   (pinblk report $REPORT)"
	echo "  picture: $PICTURE"
	echo "  logs:    $RESULTS/pinblk.*.log, $RESULTS/console.log"
	printf '  took %.0f s (one guest boot, pinblk restarted under it)\n' "$(awk -v a="$T0" -v b="$T1" 'BEGIN { print b - a }')"
	echo "  $verdict"
	for r in "${reasons[@]}"; do echo "    - $r"; done
} | tee "$RESULTS/summary.txt"
[[ $verdict == PASS ]]
