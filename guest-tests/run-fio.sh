#!/usr/bin/env bash
# guest-tests/run-fio.sh -- boot a QEMU (TCG) guest against a vhost-user-blk
# backend socket and run direct-I/O fio with crc32c verification on /dev/vda.
#
# Usage:
#   guest-tests/run-fio.sh --socket PATH [options]
#
# Options:
#   --socket PATH        vhost-user-blk backend unix socket (required)
#   --num-queues N       virtqueues requested by the guest device (default 1)
#   --size SIZE          region fio writes then reads back (default 32M);
#                        split evenly between --numjobs jobs
#   --bs SIZE            block size (default 4k)
#   --iodepth N          per-job queue depth (default 16)
#   --numjobs N          fio jobs per pass, disjoint regions (default 1)
#   --rw LIST            comma-separated passes (default randwrite,randread);
#                        see guest-init.sh (randwrite, randread, verify, ...)
#   --runtime SEC        cap each fio pass at SEC seconds (default: none)
#   --number-ios N       fio --number_ios per job (default: whole region)
#   --fio-extra 'ARGS'   extra fio arguments appended to every pass
#   --cmd 'SHELL CMD'    run this shell command in the guest instead of fio
#                        (rc of the command becomes the result; /dev/vda,
#                        fio, mkfs.ext4, e2fsck and the ext4 module are there)
#   --mem SIZE           guest RAM (default 512M)
#   --smp N              guest CPUs (default 2)
#   --cpu MODEL          QEMU -cpu model (default max)
#   --accel ACCEL        QEMU -accel (default tcg)
#   --timeout SEC        wall-clock limit; QEMU is killed after it (default 150)
#   --log FILE           guest console log (default: a temp file, kept on failure)
#   --guest-dir DIR      kernel/initramfs dir (default $PWD/target/guest);
#                        built with build-guest.sh when missing/outdated
#   --append 'ARGS'      extra kernel command line
#   --reconnect SEC      QEMU reconnects to the socket SEC seconds after the
#                        backend went away (chardev reconnect=SEC; default:
#                        no reconnect, a lost backend stops the disk)
#   --qmp PATH           QMP monitor on the unix socket PATH (server, no wait;
#                        guest-tests/qmp.py talks to it)
#   --incoming URI       start as a live migration's destination (-incoming
#                        URI): the guest arrives from another QEMU; give it
#                        the source's --job-id and its console as --prior-log
#   --job-id ID          the job id (default: a fresh one); a migration's
#                        source and destinations share one
#   --prior-log FILE     console log of an earlier QEMU process of this guest
#                        (a migration's source); repeatable, in order. The
#                        verdict reads them, then this run's console.
#   --quiet              don't stream the console while it runs
#
# Exit status: 0 only if the guest printed PINBLK-GUEST-DONE rc=0, and (in fio
# mode) every pass printed PINBLK-GUEST-RESULT status=0 errors=0 and every fio
# job line reports err= 0.  1 = test failed, 2 = usage / setup error,
# 124 = timeout.
#
# Example (against qemu-storage-daemon, see selftest-qsd.sh):
#   guest-tests/run-fio.sh --socket /tmp/vhost.sock --num-queues 2 --size 32M
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
	exit "${1:-2}"
}
die() { printf 'run-fio: ERROR: %s\n' "$*" >&2; exit 2; }
say() { printf 'run-fio: %s\n' "$*" >&2; }

SOCKET=
NUM_QUEUES=1
SIZE=32M
BS=4k
IODEPTH=16
NUMJOBS=1
RW=randwrite,randread
RUNTIME=
NUMBER_IOS=
FIO_EXTRA=
CMD=
MEM=512M
SMP=2
CPU=max
ACCEL=tcg
TIMEOUT=150
LOG=
GUEST_DIR=$PWD/target/guest
APPEND=
QUIET=0
RECONNECT=
QMP=
INCOMING=
JOB_ID=
PRIOR_LOGS=()
QEMU=${QEMU:-qemu-system-x86_64}

need() { [[ $# -ge 2 ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
	case $1 in
	--socket) need "$@"; SOCKET=$2; shift 2 ;;
	--num-queues) need "$@"; NUM_QUEUES=$2; shift 2 ;;
	--size) need "$@"; SIZE=$2; shift 2 ;;
	--bs) need "$@"; BS=$2; shift 2 ;;
	--iodepth) need "$@"; IODEPTH=$2; shift 2 ;;
	--numjobs) need "$@"; NUMJOBS=$2; shift 2 ;;
	--rw) need "$@"; RW=$2; shift 2 ;;
	--runtime) need "$@"; RUNTIME=$2; shift 2 ;;
	--number-ios) need "$@"; NUMBER_IOS=$2; shift 2 ;;
	--fio-extra) need "$@"; FIO_EXTRA=$2; shift 2 ;;
	--cmd) need "$@"; CMD=$2; shift 2 ;;
	--mem) need "$@"; MEM=$2; shift 2 ;;
	--smp) need "$@"; SMP=$2; shift 2 ;;
	--cpu) need "$@"; CPU=$2; shift 2 ;;
	--accel) need "$@"; ACCEL=$2; shift 2 ;;
	--timeout) need "$@"; TIMEOUT=$2; shift 2 ;;
	--log) need "$@"; LOG=$2; shift 2 ;;
	--guest-dir) need "$@"; GUEST_DIR=$2; shift 2 ;;
	--append) need "$@"; APPEND=$2; shift 2 ;;
	--reconnect) need "$@"; RECONNECT=$2; shift 2 ;;
	--qmp) need "$@"; QMP=$2; shift 2 ;;
	--incoming) need "$@"; INCOMING=$2; shift 2 ;;
	--job-id) need "$@"; JOB_ID=$2; shift 2 ;;
	--prior-log) need "$@"; PRIOR_LOGS+=("$2"); shift 2 ;;
	--quiet) QUIET=1; shift ;;
	-h | --help) usage 0 ;;
	*) die "unknown option: $1 (see --help)" ;;
	esac
done
[[ -n $SOCKET ]] || die "--socket is required"
[[ -S $SOCKET ]] || die "$SOCKET is not a unix socket (is the backend running?)"
[[ $NUM_QUEUES =~ ^[0-9]+$ && $NUM_QUEUES -ge 1 ]] || die "bad --num-queues $NUM_QUEUES"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "bad --timeout $TIMEOUT"
[[ -z $RECONNECT || $RECONNECT =~ ^[0-9]+$ ]] || die "bad --reconnect $RECONNECT"
[[ $NUMJOBS =~ ^[0-9]+$ && $NUMJOBS -ge 1 ]] || die "bad --numjobs $NUMJOBS"
command -v "$QEMU" >/dev/null || die "$QEMU not found (run build-guest.sh to install it)"

"$SCRIPT_DIR/build-guest.sh" "$GUEST_DIR" >&2 || die "build-guest.sh failed"
KERNEL=$GUEST_DIR/bzImage
INITRD=$GUEST_DIR/initramfs.cpio.gz

TMP=$(mktemp -d "${TMPDIR:-/tmp}/pinblk-run-fio.XXXXXX")
QEMU_PID=
TAIL_PID=
KEEP_LOG=0
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
	local rc=$?
	if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
		kill -KILL "$QEMU_PID" 2>/dev/null || true
		wait "$QEMU_PID" 2>/dev/null || true
	fi
	if [[ -n $TAIL_PID ]]; then
		kill "$TAIL_PID" 2>/dev/null || true
		wait "$TAIL_PID" 2>/dev/null || true
	fi
	if [[ $KEEP_LOG == 1 && -z $USER_LOG ]]; then
		mkdir -p "${TMPDIR:-/tmp}"
		cp "$LOG" "${TMPDIR:-/tmp}/pinblk-run-fio-$$.log" 2>/dev/null &&
			say "console log kept: ${TMPDIR:-/tmp}/pinblk-run-fio-$$.log"
	fi
	rm -rf "$TMP"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

USER_LOG=$LOG
if [[ -z $LOG ]]; then
	LOG=$TMP/console.log
else
	mkdir -p "$(dirname "$LOG")"
fi
: >"$LOG"

# ---- per-run job archive (second initramfs, appended uncompressed) ----------
mkdir -p "$TMP/job/job"
q() { printf '%q' "$1"; }
JOB_ID=${JOB_ID:-$$-$RANDOM-$(date +%s)}
{
	echo "PINBLK_JOB_ID=$(q "$JOB_ID")"
	echo "PINBLK_SIZE=$(q "$SIZE")"
	echo "PINBLK_BS=$(q "$BS")"
	echo "PINBLK_IODEPTH=$(q "$IODEPTH")"
	echo "PINBLK_NUMJOBS=$(q "$NUMJOBS")"
	echo "PINBLK_RW=$(q "$RW")"
	echo "PINBLK_RUNTIME=$(q "$RUNTIME")"
	echo "PINBLK_NUMBER_IOS=$(q "$NUMBER_IOS")"
	echo "PINBLK_FIO_EXTRA=$(q "$FIO_EXTRA")"
	if [[ -n $CMD ]]; then
		echo "PINBLK_MODE=cmd"
	else
		echo "PINBLK_MODE=fio"
	fi
} >"$TMP/job/job/env"
printf '%s\n' "$CMD" >"$TMP/job/job/cmd"
# %q output is bash syntax; the guest runs busybox ash, which understands the
# $'..' quoting %q may emit.  Keep values simple anyway.
# The kernel only accepts an uncompressed archive after a compressed one if it
# starts 4-byte aligned; gzip the job archive too and zero-pad in between.
(cd "$TMP/job" && find . -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -1 >"$TMP/job.cpio.gz"
cp "$INITRD" "$TMP/initrd"
pad=$(((4 - $(stat -c %s "$TMP/initrd") % 4) % 4))
head -c "$pad" /dev/zero >>"$TMP/initrd"
cat "$TMP/job.cpio.gz" >>"$TMP/initrd"

# ---- boot -------------------------------------------------------------------
# shellcheck disable=SC2054  # commas are QEMU option syntax
QEMU_ARGS=(
	-nodefaults -no-user-config -nographic -no-reboot
	-accel "$ACCEL" -cpu "$CPU" -smp "$SMP" -m "$MEM"
	-machine q35,memory-backend=mem
	-object "memory-backend-memfd,id=mem,size=$MEM,share=on"
	-kernel "$KERNEL" -initrd "$TMP/initrd"
	-append "console=ttyS0 panic=-1 loglevel=4 $APPEND"
	-chardev "file,id=con0,path=$LOG"
	-serial chardev:con0
	-monitor none
	-chardev "socket,id=char0,path=$SOCKET${RECONNECT:+,reconnect=$RECONNECT}"
	-device "vhost-user-blk-pci,chardev=char0,num-queues=$NUM_QUEUES"
)
[[ -z $QMP ]] || QEMU_ARGS+=(-qmp "unix:$QMP,server=on,wait=off")
[[ -z $INCOMING ]] || QEMU_ARGS+=(-incoming "$INCOMING")
say "${INCOMING:+migration destination ($INCOMING), }booting guest: socket=$SOCKET num-queues=$NUM_QUEUES size=$SIZE bs=$BS iodepth=$IODEPTH numjobs=$NUMJOBS rw=$RW${CMD:+ cmd=$CMD} timeout=${TIMEOUT}s"
START=$(date +%s.%N)
"$QEMU" "${QEMU_ARGS[@]}" </dev/null >"$TMP/qemu.out" 2>&1 &
QEMU_PID=$!
if [[ $QUIET == 0 ]]; then
	tail -n +1 -F "$LOG" 2>/dev/null &
	TAIL_PID=$!
fi

timed_out=0
deadline=$(($(date +%s) + TIMEOUT))
done_seen_at=
while kill -0 "$QEMU_PID" 2>/dev/null; do
	now=$(date +%s)
	if ((now >= deadline)); then
		timed_out=1
		say "TIMEOUT after ${TIMEOUT}s: killing QEMU (pid $QEMU_PID)"
		kill -TERM "$QEMU_PID" 2>/dev/null || true
		for _ in 1 2 3 4 5 6 7 8 9 10; do
			kill -0 "$QEMU_PID" 2>/dev/null || break
			sleep 0.2
		done
		kill -KILL "$QEMU_PID" 2>/dev/null || true
		break
	fi
	# Guest said it is done but did not power off: give it 10 s, then kill.
	if [[ -z $done_seen_at ]] && grep -q '^PINBLK-GUEST-DONE' "$LOG" 2>/dev/null; then
		done_seen_at=$now
	elif [[ -n $done_seen_at ]] && ((now - done_seen_at > 10)); then
		say "guest printed DONE but did not power off; killing QEMU"
		kill -KILL "$QEMU_PID" 2>/dev/null || true
		break
	fi
	sleep 0.2
done
qemu_rc=0
wait "$QEMU_PID" 2>/dev/null || qemu_rc=$?
QEMU_PID=
END=$(date +%s.%N)
if [[ -n $TAIL_PID ]]; then
	sleep 0.3 # let tail flush the last lines
	kill "$TAIL_PID" 2>/dev/null || true
	wait "$TAIL_PID" 2>/dev/null || true
	TAIL_PID=
fi
ELAPSED=$(awk -v a="$START" -v b="$END" 'BEGIN { printf "%.1f", b - a }')

# ---- verdict ------------------------------------------------------------------
# The console uses CRLF line ends; strip CRs before parsing.
cat ${PRIOR_LOGS[@]+"${PRIOR_LOGS[@]}"} "$LOG" | tr -d '\r' >"$TMP/console.txt"
C=$TMP/console.txt
fail=()
if [[ -s $TMP/qemu.out ]]; then
	say "qemu output:"
	sed 's/^/  qemu: /' "$TMP/qemu.out" >&2
fi
((timed_out == 0)) || fail+=("timeout after ${TIMEOUT}s")
done_line=$(grep -a '^PINBLK-GUEST-DONE ' "$C" | tail -n1 || true)
if [[ -z $done_line ]]; then
	fail+=("guest never printed PINBLK-GUEST-DONE (qemu rc=$qemu_rc)")
elif [[ $done_line != "PINBLK-GUEST-DONE rc=0" ]]; then
	fail+=("guest: $done_line")
fi
if ! grep -a -q "^PINBLK-GUEST-JOB id=$JOB_ID\$" "$C"; then
	fail+=("guest did not load this run's job archive (no PINBLK-GUEST-JOB id=$JOB_ID)")
fi
grep -a '^PINBLK-GUEST-\(WARN\|ERROR\|DISK\|CMD-END\)' "$C" || true
if [[ -z $CMD ]]; then
	echo "---- fio summary (guest console: ${USER_LOG:-temp log}) ----"
	grep -a -E '^(pinblk: \(groupid|  (read|write): IOPS| +(READ|WRITE): bw)|^fio-stderr:|verify failed|bad magic' "$C" || true
	results=$(grep -a '^PINBLK-GUEST-RESULT ' "$C" || true)
	printf '%s\n' "$results"
	npass=$(tr ',' ' ' <<<"$RW" | wc -w)
	nres=$(grep -c . <<<"$results" || true)
	((nres == npass)) || fail+=("expected $npass fio pass results, got $nres")
	while read -r line; do
		[[ -n $line ]] || continue
		[[ $line == *" status=0 "* && $line == *" errors=0 "* ]] || fail+=("${line#PINBLK-GUEST-RESULT }")
	done <<<"$results"
	if grep -a -E '\(groupid=[0-9]+, jobs=[0-9]+\): err=' "$C" | grep -a -v -q 'err= 0:'; then
		fail+=("a fio job reported a nonzero err=")
	fi
fi
say "elapsed ${ELAPSED}s (boot + test), qemu rc=$qemu_rc"
if ((${#fail[@]})); then
	KEEP_LOG=1
	for f in "${fail[@]}"; do say "FAIL: $f"; done
	((timed_out == 0)) || exit 124
	exit 1
fi
say "PASS"
exit 0
