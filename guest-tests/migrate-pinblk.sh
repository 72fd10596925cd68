#!/usr/bin/env bash
# guest-tests/migrate-pinblk.sh -- live migration of a guest whose disk is
# pinblk (issue 12), on one host: boot a QEMU (TCG) guest on pinblk's
# socket with a QMP monitor, start the workload, then --hops times start a
# destination QEMU (the same command line plus -incoming unix:...) that
# connects to the same pinblk socket while the source is still connected,
# `migrate` the guest to it over QMP in the middle of the workload, wait
# for `query-migrate` to say completed, and `quit` the source. The workload
# finishes on the last destination (hop 2 migrates back to a third QEMU:
# ping-pong). Passes only if every migration completed, the workload exits
# 0 with no verify error (its console is read across all the QEMU
# processes), the guest saw no I/O error, pinblk's report has no
# checksum_failure and one `migration` event per hop naming both
# connections, and pinblk stops cleanly on SIGTERM.
#
# Usage:
#   guest-tests/migrate-pinblk.sh [--pinblk BIN] [--policy P] [--workload W]
#                                 [--hops N] [--interval SEC] [--mem SIZE]
#                                 [--results DIR] [--verbose]
#
#   --pinblk BIN     pinblk binary (default: target/release/pinblk)
#   --policy P       pinblk --policy (default bounce)
#   --workload W     fio: fio randwrite with crc32c verify on 2 jobs, then a
#                    verify pass (default);
#                    overlap: the same fio job alongside overlap-read (K
#                    O_DIRECT reads into one buffer and a write from it, in
#                    flight together) with pinblk's READs delayed 20 ms, so
#                    conflicting pins are held (and stalled on, with
#                    --policy stall) when the source stops its rings;
#                    control: no disk I/O while migrating (fio on the
#                    guest's tmpfs), to tell TCG's own problems from pinblk's
#   --hops N         migrations (default 2: there and back again)
#   --interval SEC   seconds of workload before each migration (default 3)
#   --mem SIZE       guest RAM (default 512M: the initramfs needs it)
#   --cpu MODEL      QEMU -cpu model of every QEMU (default max)
#   --accel ACCEL    QEMU -accel of every QEMU (default tcg)
#   --smp N          guest CPUs (default 1: see SMP below; the guest
#                    then drives one of the device's 2 queues)
#   --results DIR    logs (default target/guest-results/migrate-<policy>-<workload>)
#   --attempts N     run again, up to N runs in all, when a run fails and
#                    guest-tests/migrate-verdict.py finds the guest failed
#                    on its own with pinblk's part correct (a TCG guest
#                    crash or hang: docs/DESIGN.md section 13); any other
#                    failure ends the test at once (default 1)
#   --verbose        stream the guest console
#
# Exit status: 0 pass; 3 a failure the verdict puts on the guest; 1 any
# other failure; 2 usage.
#
# Prints, per hop, QEMU's total migration time and the guest's downtime
# (query-migrate `total-time`, `downtime`, in ms), and the requests pinblk
# drained from the source when it stopped its rings.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
PINBLK=$ROOT/target/release/pinblk
POLICY=bounce
WORKLOAD=fio
HOPS=2
INTERVAL=3
MEM=512M
CPU=max
ACCEL=tcg
# One vCPU: with two, QEMU 7.2's TCG crashes or hangs the guest after its
# second migration (a guest that arrived by migration, migrated again) in
# about half the runs, also with no disk I/O at all (--workload control;
# pinblk served no request after boot in those runs). With one it passed
# every run (docs/DESIGN.md §13).
SMP=1
RESULTS=
QUIET=--quiet
ATTEMPTS=1
ARGS=("$@")
while [[ $# -gt 0 ]]; do
	case $1 in
	--pinblk) PINBLK=$2; shift 2 ;;
	--policy) POLICY=$2; shift 2 ;;
	--workload) WORKLOAD=$2; shift 2 ;;
	--hops) HOPS=$2; shift 2 ;;
	--interval) INTERVAL=$2; shift 2 ;;
	--mem) MEM=$2; shift 2 ;;
	--cpu) CPU=$2; shift 2 ;;
	--accel) ACCEL=$2; shift 2 ;;
	--smp) SMP=$2; shift 2 ;;
	--results) RESULTS=$2; shift 2 ;;
	--attempts) ATTEMPTS=$2; shift 2 ;;
	--verbose) QUIET=; shift ;;
	-h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
	*) echo "migrate-pinblk: unknown option $1 (see --help)" >&2; exit 2 ;;
	esac
done
say() { printf 'migrate-pinblk: %s\n' "$*" >&2; }
[[ -x $PINBLK ]] || { say "no pinblk binary at $PINBLK; run cargo build --release or pass --pinblk"; exit 2; }
[[ $HOPS =~ ^[1-9][0-9]*$ ]] || { say "bad --hops $HOPS"; exit 2; }
RESULTS=${RESULTS:-$ROOT/target/guest-results/migrate-$POLICY-$WORKLOAD}
[[ $ATTEMPTS =~ ^[1-9][0-9]*$ ]] || { say "bad --attempts $ATTEMPTS"; exit 2; }
if ((ATTEMPTS > 1)); then
	# Each attempt is this script with --attempts 1 (a later --results and
	# --attempts override the earlier ones) in its own directory.
	for ((a = 1; a <= ATTEMPTS; a++)); do
		arc=0
		"${BASH_SOURCE[0]}" "${ARGS[@]}" --results "$RESULTS/attempt-$a" --attempts 1 || arc=$?
		((arc == 0)) && { ((a == 1)) || say "PASS on attempt $a of $ATTEMPTS (attempts before it failed on the guest's side: see above)"; exit 0; }
		((arc == 3)) || exit "$arc"
		((a < ATTEMPTS)) && say "attempt $a failed on the guest's side (TCG, not pinblk: see the verdict above); running it again"
	done
	say "FAIL: $ATTEMPTS attempts, each failed on the guest's side"
	exit 1
fi
QMP_PY=$SCRIPT_DIR/qmp.py

"$SCRIPT_DIR/build-guest.sh" "$ROOT/target/guest" >&2
rm -rf "$RESULTS"
mkdir -p "$RESULTS"
SOCK=$RESULTS/pinblk.sock
REPORT=$RESULTS/report.jsonl
PLOG=$RESULTS/pinblk.log
CTL=$RESULTS/pinblk.ctl
# A workload that completes no request for this long has stalled.
STALL_SECS=${STALL_SECS:-45}

EXTRA=()
# The guest's fio: 2 jobs of 4 KiB random writes with crc32c verify (fio
# never touches a buffer in flight: any failure is pinblk's).
FIO_ARGS=(--numjobs 2 --iodepth 16 --size 256M --rw randwrite,verify)
case $WORKLOAD in
fio) ;;
overlap)
	EXTRA=(--inject-read-delay 20ms --inject-read-probability 0.5)
	FIO="fio --name=mig --filename=/dev/vda --direct=1 --ioengine=libaio --bs=4k --iodepth=16 --size=192M --rw=randwrite --verify=crc32c --verify_backlog=64 --verify_fatal=1 --do_verify=1 --randrepeat=1"
	# overlap-read keeps READ pins held (20 ms each) under a WRITE from the
	# same buffer: conflicts, stalled on with --policy stall, in flight
	# at every ring stop.
	CMD="$FIO >/tmp/fio.out 2>&1 & fpid=\$!; i=0; rc=0; while kill -0 \$fpid 2>/dev/null; do overlap-read --offset \$((448 << 20)) --blocks 64 --rounds 20 --verify >/tmp/ovl.out 2>&1 || rc=1; grep PINBLK-PROG /tmp/ovl.out | tail -n1; i=\$((i + 1)); done; wait \$fpid || rc=2; cat /tmp/fio.out; echo overlap-rounds=\$i fio-rc-and-overlap=\$rc; exit \$rc"
	FIO_ARGS=(--cmd "$CMD")
	;;
control)
	# No disk I/O during the migrations (fio on the guest's tmpfs): tells
	# TCG's own migration problems from pinblk's.
	FIO_ARGS=(--cmd "fio --name=ctl --filename=/tmp/ctl --size=64M --rw=randwrite --bs=4k --ioengine=psync --time_based --runtime=$((HOPS * (INTERVAL + 12) + 10)) >/tmp/fio.out 2>&1; rc=\$?; tail -n 5 /tmp/fio.out; exit \$rc")
	;;
*) say "unknown --workload $WORKLOAD"; exit 2 ;;
esac

PID=
RUNS=()
cleanup() {
	[[ -n $PID ]] && kill -KILL "$PID" 2>/dev/null || true
	for r in "${RUNS[@]}"; do kill -TERM "$r" 2>/dev/null || true; done
}
trap cleanup EXIT

RUST_LOG=${RUST_LOG:-info} "$PINBLK" serve --socket "$SOCK" --image "$RESULTS/disk.img" \
	--size 512M --num-queues 2 --report "$REPORT" --policy "$POLICY" --control "$CTL" \
	${EXTRA[@]+"${EXTRA[@]}"} 2>"$PLOG" &
PID=$!
for _ in $(seq 100); do
	[[ -S $SOCK ]] && break
	sleep 0.05
done
[[ -S $SOCK ]] || { cat "$PLOG" >&2; say "pinblk did not start"; exit 1; }

JOB=mig-$$-$RANDOM
# Starts QEMU number $1 (0: the source; others: -incoming) in the background.
start_qemu() {
	local n=$1 prior=() i
	local args=(--socket "$SOCK" --num-queues 2 --mem "$MEM" --cpu "$CPU" --accel "$ACCEL" --smp "$SMP" --timeout 600
		--qmp "$RESULTS/qmp.$n" --job-id "$JOB" --log "$RESULTS/console.$n.log")
	if ((n > 0)); then
		args+=(--incoming "unix:$RESULTS/mig.$n")
		for ((i = 0; i < n; i++)); do prior+=(--prior-log "$RESULTS/console.$i.log"); done
	fi
	"$SCRIPT_DIR/run-fio.sh" "${args[@]}" ${prior[@]+"${prior[@]}"} "${FIO_ARGS[@]}" $QUIET \
		>"$RESULTS/run-fio.$n.out" 2>&1 &
	RUNS[n]=$!
}
# Waits up to $2 tenths of a second for the file $1 to exist.
wait_for() {
	for _ in $(seq "$2"); do
		[[ -e $1 ]] && return 0
		sleep 0.1
	done
	return 1
}
qmp() { "$QMP_PY" "$@"; }

start_qemu 0
started=0
for _ in $(seq 900); do
	if grep -a -q -E '^PINBLK-GUEST-(FIO|CMD)-BEGIN' "$RESULTS/console.0.log" 2>/dev/null; then
		started=1
		break
	fi
	kill -0 "${RUNS[0]}" 2>/dev/null || break
	sleep 0.1
done
((started)) || { cat "$RESULTS/run-fio.0.out" >&2; say "the workload never started in the guest"; exit 1; }

fail=()
hops=()
for ((hop = 1; hop <= HOPS; hop++)); do
	src=$((hop - 1))
	sleep "$INTERVAL"
	if ! kill -0 "${RUNS[src]}" 2>/dev/null; then
		fail+=("the workload ended before migration $hop: make it longer")
		break
	fi
	start_qemu "$hop"
	# The destination listens for the migration and is connected to pinblk.
	if ! wait_for "$RESULTS/mig.$hop" 300 || ! wait_for "$RESULTS/qmp.$hop" 300; then
		cat "$RESULTS/run-fio.$hop.out" >&2
		fail+=("destination $hop did not start")
		break
	fi
	conns=$(grep -c 'frontend connected' "$PLOG" || true)
	qmp "$RESULTS/qmp.$src" migrate-set-parameters '{"max-bandwidth": 4294967296}' >/dev/null
	t0=$(date +%s.%N)
	qmp "$RESULTS/qmp.$src" migrate "{\"uri\": \"unix:$RESULTS/mig.$hop\"}" >/dev/null
	status=
	for _ in $(seq 1200); do
		info=$(qmp "$RESULTS/qmp.$src" query-migrate)
		status=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("status",""))' "$info")
		[[ $status == completed || $status == failed || $status == cancelled ]] && break
		sleep 0.1
	done
	echo "$info" >"$RESULTS/migrate.$hop.json"
	if [[ $status != completed ]]; then
		fail+=("migration $hop: status $status ($info)")
		break
	fi
	read -r total down < <(python3 -c 'import json,sys; m=json.loads(sys.argv[1]); print(m.get("total-time","?"), m.get("downtime","?"))' "$info")
	# The source has handed over: quit it (its connection to pinblk ends).
	qmp "$RESULTS/qmp.$src" quit >/dev/null || true
	wait "${RUNS[src]}" || true
	hops+=("hop $hop (QEMU $src -> QEMU $hop): total ${total} ms, downtime ${down} ms, $(python3 -c 'import sys; print(sys.argv[1])' "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s to quit the source", b - a }')"); pinblk connections before: $conns")
	say "${hops[-1]}"
done

# pinblk's request counters (completed requests by kind), as one line.
requests() { "$PINBLK" ctl "$CTL" query-stats 2>/dev/null | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin).get("requests")))' 2>/dev/null || echo "?"; }
# What a stalled run looked like from both sides: the guest's virtqueues
# as the last QEMU sees them, and pinblk's counters and pins.
diagnose() {
	local q=$1 d path
	{
		echo "== pinblk query-stats"; "$PINBLK" ctl "$CTL" query-stats || true
		echo "== pinblk query-pins"; "$PINBLK" ctl "$CTL" query-pins || true
		for path in $(qmp "$q" x-query-virtio 2>/dev/null | python3 -c 'import json,sys; [print(d["path"]) for d in json.load(sys.stdin)]' 2>/dev/null); do
			for d in 0 1; do
				echo "== QEMU $path queue $d (x-query-virtio-queue-status)"
				qmp "$q" x-query-virtio-queue-status "{\"path\": \"$path\", \"queue\": $d}" || true
				echo "== QEMU $path queue $d (x-query-virtio-vhost-queue-status)"
				qmp "$q" x-query-virtio-vhost-queue-status "{\"path\": \"$path\", \"queue\": $d}" | tee "$RESULTS/vq.json" || true
				# The split ring's indices and event fields in guest memory
				# (virtio 1.2 2.7.6-2.7.8): avail flags/idx, used_event,
				# used flags/idx, avail_event.
				read -r avail used num < <(python3 -c 'import json; v=json.load(open("'"$RESULTS/vq.json"'")); print(v["avail-phys"], v["used-phys"], v["num"])' 2>/dev/null) || continue
				((num > 0)) || continue
				for probe in "avail_idx:$((avail + 2))" "used_event:$((avail + 4 + 2 * num))" "used_idx:$((used + 2))" "avail_event:$((used + 4 + 8 * num))"; do
					IFS=: read -r what addr <<<"$probe"
					# "000000001ffdd802: 0x0001\r\n" -> 1
					val=$(qmp "$q" human-monitor-command "{\"command-line\": \"xp /1hx $addr\"}" |
						python3 -c 'import json,sys; print(int(json.load(sys.stdin).split()[1], 16))' 2>/dev/null) || val=?
					echo "guest-side $what=$val"
				done
			done
		done
		echo "== QEMU info cpus / info registers"
		qmp "$q" human-monitor-command '{"command-line": "info cpus"}' || true
		qmp "$q" human-monitor-command '{"command-line": "info registers"}' | head -c 600 || true
		echo
		# Two samples 2 s apart of the vCPU's flags: a kernel spinning with
		# interrupts off (RFL without IF 0x200, not halted) cannot take
		# the interrupt of a completion; one waiting for it idles (HLT=1).
		for _ in 1 2; do
			qmp "$q" human-monitor-command '{"command-line": "info registers"}' |
				python3 -c 'import json,re,sys; t=json.load(sys.stdin); g=lambda k: (re.search(k+r"=([0-9a-f]+)", t) or [None, "?"])[1]; print("guest-side cpu rfl=%s hlt=%s rip=%s" % (g("RFL"), g("HLT"), g("RIP")))' || true
			sleep 2
		done
		echo "== pinblk log (last 40 lines)"; tail -n 40 "$PLOG"
		echo "== guest console (last 40 lines)"; tail -n 40 "$RESULTS/console.$last.log" | tr -d '\r'
	} >"$RESULTS/stall.txt" 2>&1
	sed 's/^/  stall: /' "$RESULTS/stall.txt" >&2
}

rc=0
last=$((${#RUNS[@]} - 1))
# Watch the workload on the last destination: a run in which pinblk
# completes no request for STALL_SECS is diagnosed and stopped (instead of
# waiting out run-fio's timeout with nothing to show for it).
seen=$(requests)
still=0
stalled=0
while kill -0 "${RUNS[last]}" 2>/dev/null; do
	sleep 5
	now=$(requests)
	if [[ $now == "$seen" ]]; then still=$((still + 5)); else still=0; seen=$now; fi
	grep -a -q 'PINBLK-GUEST-\(CMD\|FIO\)-END\|PINBLK-GUEST-DONE' "$RESULTS/console.$last.log" 2>/dev/null && still=0
	if ((still >= STALL_SECS)); then
		say "no request completed for ${STALL_SECS} s on QEMU $last: diagnosing ($RESULTS/stall.txt)"
		diagnose "$RESULTS/qmp.$last"
		stalled=1
		kill -TERM "${RUNS[last]}" 2>/dev/null || true
		break
	fi
done
wait "${RUNS[last]}" || rc=$?
((stalled == 0)) || fail+=("the workload on QEMU $last stalled: no request completed for ${STALL_SECS} s (see stall: lines above)")
kill -TERM "$PID"
prc=0
wait "$PID" || prc=$?
PID=

cat "$RESULTS/run-fio.$last.out"
((${#fail[@]})) || ((rc == 0)) || fail+=("the workload on the last destination: run-fio.sh exited $rc")
((prc == 0)) || fail+=("pinblk exited $prc on SIGTERM")
cat "$RESULTS"/console.*.log | tr -d '\r' >"$RESULTS/console.all"
if grep -a -q -i 'I/O error\|is not a head' "$RESULTS/console.all"; then fail+=("guest console: I/O error or \"is not a head\""); fi
failures=$(grep -c '"kind":"checksum_failure"' "$REPORT" 2>/dev/null || true)
((failures == 0)) || fail+=("$failures checksum_failure event(s) in the report")
migrations=$(grep -c '"kind":"migration"' "$REPORT" 2>/dev/null || true)
named=$(grep '"kind":"migration"' "$REPORT" 2>/dev/null | grep -c '"destination_connection"' || true)
((migrations == ${#hops[@]} && named == ${#hops[@]})) || [[ $WORKLOAD == control ]] ||
	fail+=("$migrations migration event(s), $named naming a destination connection; expected ${#hops[@]}")
grep -q 'checksum store closed cleanly\|closed cleanly' "$PLOG" || say "note: no clean-close line in pinblk.log"
grep '"kind":"migration"' "$REPORT" 2>/dev/null | sed 's/^/  report: /' >&2 || true
grep -a 'PINBLK-PROG\|overlap-rounds' "$RESULTS/console.all" | tail -n 3 | sed 's/^/  guest: /' >&2 || true
conflicts=$(grep -c '"kind":"conflict"' "$REPORT" 2>/dev/null || true)
if [[ $POLICY == stall ]]; then
	other=$(grep '"kind":"conflict"' "$REPORT" 2>/dev/null | grep -v -c '"action":"stall' || true)
	((other == 0)) || fail+=("$other conflict event(s) with an action other than stall / stall_timeout_bounce")
fi
if [[ $WORKLOAD == overlap ]]; then
	((conflicts > 0)) || fail+=("no conflict event: overlap-read held no pins")
fi
say "policy $POLICY, workload $WORKLOAD: $conflicts conflict event(s)"
for h in "${hops[@]}"; do say "$h"; done
if ((${#fail[@]})); then
	for f in "${fail[@]}"; do say "FAIL: $f"; done
	grep -a -m 3 'Oops\|BUG:\|kernel BUG\|Kernel panic\|is not a head' "$RESULTS/console.all" | sed 's/^/  guest: /' >&2 || true
	grep 'started:\|stopped after' "$PLOG" | sed 's/^.*\] /  rings: /' >&2 || true
	vrc=0
	verdict=$("$SCRIPT_DIR/migrate-verdict.py" "$RESULTS") || vrc=$?
	say "whose failure: $verdict"
	say "logs in $RESULTS"
	((vrc == 3)) && exit 3
	exit 1
fi
say "PASS: ${#hops[@]} live migration(s) under $WORKLOAD with --policy $POLICY, 0 checksum_failure"
