#!/usr/bin/env python3
"""guest-tests/migrate-verdict.py -- whose failure was a failed migration run?

Usage: migrate-verdict.py RESULTS_DIR

Reads what guest-tests/migrate-pinblk.sh left in RESULTS_DIR (pinblk.log,
report.jsonl, console.all, stall.txt) after a failed run and prints one
line: "guest: <why>" when the evidence says pinblk did its part and the
guest failed on its own (QEMU 7.2's TCG loses guest pages across a
migration now and then: docs/DESIGN.md section 13), or "pinblk: <why>"
otherwise. Exit status 3 for "guest", 1 for "pinblk".

pinblk did its part when all of these hold:
  - no checksum_failure in the report, no I/O error in the guest console
    (I/O errors after an "is not a head" do not count: the driver has
    broken the ring, and fails every request from then on);
  - at every ring stop every popped request was completed (next avail ==
    next used == the used idx in guest memory), and every destination
    started where its source stopped (same next avail and next used);
  - the failure is a guest kernel crash (Oops, BUG, panic, "is not a
    head" with the indices above consistent), or a stall in which pinblk
    has nothing in flight and the driver has seen every used element
    (avail idx == used idx == used_event in guest memory: it is not
    waiting for an interrupt pinblk owed it), or with no pin held and the
    guest's vCPU spinning with interrupts disabled (RFL without IF, not
    halted) in every sample: a kernel stuck like that takes no interrupt
    at all, pinblk's or any other.
"""

import json
import re
import sys

RING = re.compile(
    r"connection (\d+): queue (\d+) (started|stopped after draining \d+ request\(s\)): "
    r"next avail (\d+), next used (\d+); in guest memory: avail idx ([^,;\s]+), used idx ([^,;\s]+)"
)


def main():
    d = sys.argv[1]

    def read(name):
        try:
            with open(f"{d}/{name}", encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def verdict(who, why):
        print(f"{who}: {why}")
        return 3 if who == "guest" else 1

    report = read("report.jsonl")
    if '"kind":"checksum_failure"' in report:
        return verdict("pinblk", "checksum_failure in the report")
    console = read("console.all")
    # Once virtio_blk finds an id that is not a head it marks the virtqueue
    # broken, and every request after fails with an I/O error: those follow
    # from the "not a head" (judged with the crashes below), not from pinblk.
    # An I/O error before it is pinblk's.
    broken = re.search(r"is not a head", console)
    if re.search(r"I/O error", console[: broken.start()] if broken else console, re.I):
        return verdict("pinblk", "the guest saw an I/O error")

    log = read("pinblk.log")
    if re.search(r"more like this suppressed.*queue \d+ (started|stopped after)", log):
        return verdict("pinblk", "ring lines were rate-limited away: the indices cannot be checked")
    last_stop = {}
    for m in RING.finditer(log):
        conn, queue, what = int(m[1]), int(m[2]), m[3]
        nxt, used, mem_used = int(m[4]), int(m[5]), m[7]
        if what.startswith("stopped"):
            if nxt != used or mem_used != str(used):
                return verdict(
                    "pinblk",
                    f"connection {conn} queue {queue} stopped with next avail {nxt}, "
                    f"next used {used}, used idx {mem_used}: a request not completed or completed twice",
                )
            last_stop[queue] = (conn, nxt, used)
        elif conn > 1 and queue in last_stop and last_stop[queue][0] != conn:
            src, s_nxt, s_used = last_stop[queue]
            if (nxt, used) != (s_nxt, s_used):
                return verdict(
                    "pinblk",
                    f"connection {conn} queue {queue} started at next avail {nxt}, next used {used}; "
                    f"connection {src} stopped at {s_nxt}, {s_used}",
                )

    crash = re.search(r"Oops|BUG:|kernel BUG|Kernel panic|is not a head|general protection", console)
    if crash:
        return verdict("guest", f"the guest kernel crashed ({crash[0]!r}) with pinblk's ring indices consistent at every stop and start")

    stall = read("stall.txt")
    if stall:
        vals = dict(re.findall(r"^guest-side (\w+)=(\d+)$", stall, re.M))
        inflight = re.search(r'"inflight_pins":\s*(\d+)', stall)
        if (
            vals.get("avail_idx") is not None
            and vals.get("avail_idx") == vals.get("used_idx") == vals.get("used_event")
            and (inflight is None or inflight[1] == "0")
        ):
            return verdict(
                "guest",
                f"stalled with nothing in flight: avail idx = used idx = used_event = {vals['used_idx']} "
                "(the driver saw every completion; it stopped submitting)",
            )
        cpus = re.findall(r"^guest-side cpu rfl=([0-9a-f]+) hlt=(\d) rip=([0-9a-f]+)$", stall, re.M)
        if (
            len(cpus) >= 2
            and (inflight is None or inflight[1] == "0")
            and all(int(rfl, 16) & 0x200 == 0 and hlt == "0" for rfl, hlt, _ in cpus)
        ):
            return verdict(
                "guest",
                f"stalled with nothing in flight and the guest's only vCPU spinning with interrupts "
                f"disabled in every sample (RIP {', '.join(r for _, _, r in cpus)}): it cannot take "
                f"any interrupt, so pinblk's were not the missing ones ({json.dumps(vals)})",
            )
        return verdict("pinblk", f"stalled and the guest may be waiting on pinblk: {json.dumps(vals)}")
    return verdict("pinblk", "no evidence that the guest failed on its own")


if __name__ == "__main__":
    sys.exit(main())
