#!/bin/sh
# guest-tests/guest-init.sh -- becomes /init (PID 1) inside the pinblk test
# guest initramfs built by build-guest.sh.  Not meant to run on the host.
#
# What it does:
#   1. mounts devtmpfs, proc, sysfs; loads the modules listed in
#      /lib/modules/pinblk/load-order (missing / failing ones are tolerated);
#   2. sources the job description /job/env (appended per run by run-fio.sh
#      as a second, uncompressed cpio archive); a few settings can also be
#      overridden on the kernel command line as pinblk.<name>=<value>
#      (e.g. pinblk.size=16M pinblk.rw=randwrite,randread);
#   3. either runs /job/cmd (PINBLK_MODE=cmd) or one fio pass per entry of
#      PINBLK_RW against PINBLK_DEV with direct I/O and crc32c verification;
#   4. prints machine-readable marker lines on the console:
#        PINBLK-GUEST-BOOT kernel=...
#        PINBLK-GUEST-RESULT job=<pass> status=<fio rc> errors=<sum of job errors> ...
#        PINBLK-GUEST-DONE rc=<n>
#      and powers the VM off.
#
# Job variables (all optional; defaults below):
#   PINBLK_MODE=fio|cmd      PINBLK_DEV=/dev/vda
#   PINBLK_RW=randwrite,randread   comma/space separated passes; known names:
#       randwrite  random writes, then fio's verify phase reads them back
#       randread   random reads of the same region, crc32c-verified
#       verify     replay of the randwrite job with --verify_only (also checks
#                  fio's per-block seed headers, i.e. data from THIS write pass)
#       anything else is passed as --rw=<name> with the same verify options
#   PINBLK_SIZE=32M (total region; split evenly between PINBLK_NUMJOBS jobs)
#   PINBLK_BS=4k PINBLK_IODEPTH=16 PINBLK_NUMJOBS=1
#   PINBLK_RUNTIME=  (seconds, caps each pass; empty = no cap)
#   PINBLK_NUMBER_IOS= (fio --number_ios per job; empty = whole region)
#   PINBLK_FIO_EXTRA=  (extra fio arguments, word-split)
#   PINBLK_WAIT_DEV=30 (seconds to wait for PINBLK_DEV to appear)

PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH

mount -t devtmpfs devtmpfs /dev 2>/dev/null
# The initramfs carries no /dev/console node (it is built without root), so
# the kernel could not give us stdio: attach it now.
exec </dev/console >/dev/console 2>&1

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /tmp /mnt /run
mount -t tmpfs tmpfs /tmp
# No modprobe database in here; keep the kernel from exec'ing one.
echo "" >/proc/sys/kernel/modprobe 2>/dev/null || true
# Keep the console readable: only warnings and worse from the kernel.
echo 4 >/proc/sys/kernel/printk 2>/dev/null || true

finish() {
	echo "PINBLK-GUEST-DONE rc=$1"
	echo "PINBLK-GUEST-INFO uptime=$(cut -d" " -f1 /proc/uptime)"
	sync
	poweroff -f
	echo o >/proc/sysrq-trigger
	sleep 5
	exit "$1" # kernel panics, panic=-1 reboots, QEMU -no-reboot exits
}

echo "PINBLK-GUEST-BOOT kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) uptime=$(cut -d" " -f1 /proc/uptime)"

if [ -f /lib/modules/pinblk/load-order ]; then
	while read -r mod; do
		[ -n "$mod" ] || continue
		f=/lib/modules/pinblk/$mod.ko
		if [ ! -f "$f" ]; then
			echo "PINBLK-GUEST-INFO module $mod not shipped (built in or absent)"
			continue
		fi
		if ! out=$(insmod "$f" 2>&1); then
			case $out in
			*"File exists"*) ;;
			*) echo "PINBLK-GUEST-WARN insmod $mod failed: $out" ;;
			esac
		fi
	done </lib/modules/pinblk/load-order
fi

# ---- job parameters -------------------------------------------------------
PINBLK_MODE=fio
PINBLK_DEV=/dev/vda
PINBLK_RW=randwrite,randread
PINBLK_SIZE=32M
PINBLK_BS=4k
PINBLK_IODEPTH=16
PINBLK_NUMJOBS=1
PINBLK_RUNTIME=
PINBLK_NUMBER_IOS=
PINBLK_FIO_EXTRA=
PINBLK_WAIT_DEV=30
if [ -f /job/env ]; then
	# shellcheck disable=SC1091
	. /job/env
fi
if [ -n "${PINBLK_JOB_ID:-}" ]; then
	echo "PINBLK-GUEST-JOB id=$PINBLK_JOB_ID"
else
	echo "PINBLK-GUEST-WARN no /job/env (job archive missing); using defaults"
fi
# shellcheck disable=SC2013  # the command line is a list of words
for arg in $(cat /proc/cmdline); do
	case $arg in
	pinblk.mode=*) PINBLK_MODE=${arg#*=} ;;
	pinblk.dev=*) PINBLK_DEV=${arg#*=} ;;
	pinblk.rw=*) PINBLK_RW=${arg#*=} ;;
	pinblk.size=*) PINBLK_SIZE=${arg#*=} ;;
	pinblk.bs=*) PINBLK_BS=${arg#*=} ;;
	pinblk.iodepth=*) PINBLK_IODEPTH=${arg#*=} ;;
	pinblk.numjobs=*) PINBLK_NUMJOBS=${arg#*=} ;;
	pinblk.runtime=*) PINBLK_RUNTIME=${arg#*=} ;;
	pinblk.number_ios=*) PINBLK_NUMBER_IOS=${arg#*=} ;;
	esac
done

# ---- wait for the disk ----------------------------------------------------
i=0
while [ ! -b "$PINBLK_DEV" ] && [ "$i" -lt $((PINBLK_WAIT_DEV * 10)) ]; do
	sleep 0.1
	i=$((i + 1))
done
if [ -b "$PINBLK_DEV" ]; then
	d=${PINBLK_DEV#/dev/}
	nq=$(find "/sys/block/$d/mq" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
	sectors=$(cat "/sys/block/$d/size" 2>/dev/null)
	q=/sys/block/$d/queue
	lbs=$(cat "$q/logical_block_size" 2>/dev/null)
	pbs=$(cat "$q/physical_block_size" 2>/dev/null)
	dmax=$(cat "$q/discard_max_bytes" 2>/dev/null)
	wzmax=$(cat "$q/write_zeroes_max_bytes" 2>/dev/null)
	echo "PINBLK-GUEST-DISK dev=$PINBLK_DEV sectors=$sectors mq_queues=$nq lbs=$lbs pbs=$pbs discard_max_bytes=$dmax write_zeroes_max_bytes=$wzmax"
elif [ "$PINBLK_MODE" = fio ]; then
	echo "PINBLK-GUEST-ERROR $PINBLK_DEV did not appear within ${PINBLK_WAIT_DEV}s"
	ls -l /dev/vd* /sys/bus/virtio/devices 2>&1
	finish 2
fi

# ---- arbitrary command mode -------------------------------------------------
if [ "$PINBLK_MODE" = cmd ]; then
	echo "PINBLK-GUEST-CMD-BEGIN"
	sh /job/cmd
	rc=$?
	echo "PINBLK-GUEST-CMD-END rc=$rc"
	finish "$rc"
fi

# ---- size arithmetic: split the region between the jobs ---------------------
to_bytes() {
	v=$1
	case $v in
	*[kK] | *[kK]i[bB] | *[kK][bB]) n=${v%%[kK]*}; m=1024 ;;
	*[mM] | *[mM]i[bB] | *[mM][bB]) n=${v%%[mM]*}; m=1048576 ;;
	*[gG] | *[gG]i[bB] | *[gG][bB]) n=${v%%[gG]*}; m=1073741824 ;;
	*) n=$v; m=1 ;;
	esac
	echo $((n * m))
}
total=$(to_bytes "$PINBLK_SIZE")
bsb=$(to_bytes "$PINBLK_BS")
per_job=$((total / PINBLK_NUMJOBS / bsb * bsb))
if [ "$per_job" -le 0 ]; then
	echo "PINBLK-GUEST-ERROR size $PINBLK_SIZE too small for $PINBLK_NUMJOBS jobs of bs $PINBLK_BS"
	finish 2
fi

overall=0
for pass in $(echo "$PINBLK_RW" | tr ',' ' '); do
	case $pass in
	verify) rwargs="--rw=randwrite --verify_only=1" ;;
	*) rwargs="--rw=$pass" ;;
	esac
	extra=""
	[ -n "$PINBLK_RUNTIME" ] && extra="$extra --runtime=$PINBLK_RUNTIME"
	[ -n "$PINBLK_NUMBER_IOS" ] && extra="$extra --number_ios=$PINBLK_NUMBER_IOS"
	# All passes share the job name, seed and layout so that the read/verify
	# passes regenerate exactly the blocks written by the randwrite pass.
	echo "PINBLK-GUEST-FIO-BEGIN job=$pass"
	# shellcheck disable=SC2086
	fio --name=pinblk --filename="$PINBLK_DEV" $rwargs \
		--direct=1 --ioengine=libaio --iodepth="$PINBLK_IODEPTH" \
		--bs="$PINBLK_BS" --size="$per_job" --numjobs="$PINBLK_NUMJOBS" \
		--offset_increment="$per_job" \
		--verify=crc32c --verify_fatal=1 --do_verify=1 \
		--randrepeat=1 --randseed=4242 \
		--output-format=normal,terse --terse-version=3 \
		$extra $PINBLK_FIO_EXTRA >/tmp/fio.out 2>/tmp/fio.err
	rc=$?
	grep -v '^3;' /tmp/fio.out
	sed 's/^/fio-stderr: /' /tmp/fio.err
	# terse v3: 5=error 6=read_kb 7=read_bw(KiB/s) 8=read_iops
	#           47=write_kb 48=write_bw(KiB/s) 49=write_iops
	summary=$(awk -F';' '
		$1 == "3" { n++; err += ($5 != 0); rkb += $6; rbw += $7; riops += $8;
		            wkb += $47; wbw += $48; wiops += $49 }
		END { printf "jobs=%d errors=%d read_kib=%d read_bw_kib=%d read_iops=%d write_kib=%d write_bw_kib=%d write_iops=%d",
		      n, err, rkb, rbw, riops, wkb, wbw, wiops }' /tmp/fio.out)
	case $summary in
	jobs=0\ *) [ "$rc" -ne 0 ] || rc=3 ;; # fio printed no result at all
	esac
	case $summary in
	*" errors=0 "*) ;;
	*) [ "$rc" -ne 0 ] || rc=4 ;;
	esac
	grep -q 'verify failed\|bad magic\|verify: bad' /tmp/fio.err /tmp/fio.out && [ "$rc" -eq 0 ] && rc=5
	echo "PINBLK-GUEST-RESULT job=$pass status=$rc $summary"
	[ "$rc" -eq 0 ] || overall=1
	if [ "$rc" -ne 0 ]; then
		break
	fi
done

finish "$overall"
