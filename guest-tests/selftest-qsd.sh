#!/usr/bin/env bash
# guest-tests/selftest-qsd.sh -- prove the guest test scripts work, using
# qemu-storage-daemon as the vhost-user-blk backend (no pinblk needed).
#
# Usage: guest-tests/selftest-qsd.sh [--quick] [--guest-dir DIR] [--keep]
#
#   For 1 and then 2 queues: create a 256 MiB raw image, export it with
#   qemu-storage-daemon (vhost-user-blk, num-queues=N) and run run-fio.sh
#   against it (randwrite + randread, crc32c-verified).  Unless --quick, also:
#     - a --cmd test: mkfs.ext4 + mount + write/read a file in the guest;
#     - negative tests: a --cmd that exits 7, and a verified randread of a
#       never-written disk, must make run-fio.sh fail (rc 1);
#     - a guest that hangs (--cmd 'sleep 1000', --timeout 20) must be killed
#       and reported as a timeout (rc 124).
#   --keep keeps the temp dir (images, logs).  Exits 0 if all cases pass.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
QUICK=0
KEEP=0
GUEST_DIR=$PWD/target/guest
while [[ $# -gt 0 ]]; do
	case $1 in
	--quick) QUICK=1; shift ;;
	--keep) KEEP=1; shift ;;
	--guest-dir) GUEST_DIR=$2; shift 2 ;;
	-h | --help) sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
	*) echo "unknown option $1" >&2; exit 2 ;;
	esac
done

say() { printf 'selftest-qsd: %s\n' "$*" >&2; }
QSD=${QSD:-qemu-storage-daemon}
command -v "$QSD" >/dev/null || { say "ERROR: $QSD not found (apt-get install qemu-system-x86)"; exit 2; }

"$SCRIPT_DIR/build-guest.sh" "$GUEST_DIR"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/pinblk-selftest.XXXXXX")
QSD_PID=
stop_qsd() {
	if [[ -n $QSD_PID ]]; then
		kill -TERM "$QSD_PID" 2>/dev/null || true
		for _ in $(seq 50); do
			kill -0 "$QSD_PID" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$QSD_PID" 2>/dev/null || true
		wait "$QSD_PID" 2>/dev/null || true
		QSD_PID=
	fi
}
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
	local rc=$?
	stop_qsd
	if [[ $KEEP == 1 ]]; then
		say "kept $TMP"
	else
		rm -rf "$TMP"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_qsd() { # start_qsd NAME NUM_QUEUES -> sets SOCK
	local name=$1 nq=$2 img=$TMP/$1.img
	SOCK=$TMP/$name.sock
	truncate -s 256M "$img"
	"$QSD" \
		--blockdev "driver=file,node-name=file0,filename=$img,cache.direct=off" \
		--blockdev driver=raw,node-name=disk0,file=file0 \
		--export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$nq" \
		>"$TMP/$name.qsd.log" 2>&1 &
	QSD_PID=$!
	for _ in $(seq 100); do
		[[ -S $SOCK ]] && return 0
		kill -0 "$QSD_PID" 2>/dev/null || break
		sleep 0.1
	done
	say "ERROR: qemu-storage-daemon did not create $SOCK"
	cat "$TMP/$name.qsd.log" >&2
	return 1
}

results=()
failed=0
run_case() { # run_case NAME EXPECT(pass|fail) NUM_QUEUES [run-fio args...]
	local name=$1 expect=$2 nq=$3 rc=0 t0 t1
	shift 3
	say "=== case $name (expect $expect, num-queues=$nq) ==="
	start_qsd "$name" "$nq"
	t0=$(date +%s)
	"$SCRIPT_DIR/run-fio.sh" --socket "$SOCK" --num-queues "$nq" \
		--guest-dir "$GUEST_DIR" --log "$TMP/$name.console.log" --quiet "$@" || rc=$?
	t1=$(date +%s)
	stop_qsd
	local want=0
	case $expect in
	fail) want=1 ;;
	timeout) want=124 ;;
	esac
	if ((rc == want)); then
		results+=("PASS $name (run-fio rc=$rc, $((t1 - t0))s)")
	else
		results+=("FAIL $name (run-fio rc=$rc, expected $expect, $((t1 - t0))s; log $TMP/$name.console.log)")
		failed=1
		KEEP=1
	fi
}

run_case fio-1q pass 1
run_case fio-2q pass 2
if [[ $QUICK == 0 ]]; then
	run_case ext4-cmd pass 1 --cmd '
		set -e
		mkfs.ext4 -q -F /dev/vda
		mount -t ext4 /dev/vda /mnt
		dd if=/dev/urandom of=/tmp/ref bs=1M count=4 2>/dev/null
		cp /tmp/ref /mnt/f
		umount /mnt
		mount -t ext4 /dev/vda /mnt
		cmp /tmp/ref /mnt/f
		umount /mnt
		e2fsck -fn /dev/vda >/dev/null
		echo ext4-ok'
	run_case negative-cmd fail 1 --cmd 'echo about to fail; exit 7'
	# Reading a never-written (all-zero) disk must fail fio's verification.
	run_case negative-verify fail 1 --rw randread --size 8M
	# A guest that never finishes must be killed at the deadline.
	run_case timeout timeout 1 --timeout 20 --cmd 'sleep 1000'
fi

say "summary:"
printf '  %s\n' "${results[@]}" >&2
exit "$failed"
