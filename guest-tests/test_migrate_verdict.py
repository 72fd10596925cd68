#!/usr/bin/env python3
"""guest-tests/test_migrate_verdict.py -- unit tests of migrate-verdict.py.

The verdict decides whether a failed migration attempt is retried (the
guest's failure) or fails CI at once (pinblk's): each rule of its
docstring gets a made-up results directory here, in the file formats
guest-tests/migrate-pinblk.sh leaves (pinblk.log with the `pinblk::ring`
lines, console.all, report.jsonl, stall.txt), and the test checks the
exit status (3 guest, 1 pinblk) and the reason. Run by ci/test:

    python3 -m unittest discover -s guest-tests -p 'test_*.py'
"""

import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrate-verdict.py")
T = "[2026-11-30T14:21:22.489Z INFO  pinblk::ring] "
# What pinblk appends to the ring lines: the last entries of both rings.
TAIL = "; last heads made available [4 15 19]; last used elements (head:len) [0:4097 18:1 11:4097]"


def start(conn, avail, used=None):
    used = avail if used is None else used
    return (
        f"{T}connection {conn}: queue 0 started: next avail {avail}, next used {used}; "
        f"in guest memory: avail idx {avail}, used idx {used}{TAIL}\n"
    )


def stop(conn, avail, used=None, mem_used=None):
    used = avail if used is None else used
    mem_used = used if mem_used is None else mem_used
    return (
        f"{T}connection {conn}: queue 0 stopped after draining 3 request(s): next avail {avail}, "
        f"next used {used}; in guest memory: avail idx {avail}, used idx {mem_used}{TAIL}\n"
    )


# Two hops with consistent indices: source 1 stops at 100, destination 2
# starts there and stops at 250, destination 3 starts there.
GOOD_LOG = start(1, 0) + stop(1, 100) + start(2, 100) + stop(2, 250) + start(3, 250)
OOPS = "[   41.2] BUG: kernel NULL pointer dereference, address: 0000000000000008\n"
QUIET_STALL = (
    '{"return": {"counters": {"inflight_pins": 0}}}\n'
    "guest-side avail_idx=7239\nguest-side used_event=7239\nguest-side used_idx=7239\n"
)


def spinning(*rfls):
    return "".join(f"guest-side cpu rfl={r} hlt=0 rip=ffffffff8100abcd\n" for r in rfls)


class Verdict(unittest.TestCase):
    def judge(self, **files):
        with tempfile.TemporaryDirectory() as d:
            for name, text in files.items():
                with open(os.path.join(d, name.replace("_", ".", 1)), "w", encoding="utf-8") as f:
                    f.write(text)
            p = subprocess.run(
                [sys.executable, SCRIPT, d], capture_output=True, text=True, check=False
            )
        who = {3: "guest", 1: "pinblk"}.get(p.returncode, f"exit {p.returncode}")
        return who, p.stdout.strip()

    def assertVerdict(self, want, why, **files):
        who, out = self.judge(**files)
        self.assertEqual(who, want, out)
        self.assertIn(why, out)

    def test_a_crash_with_consistent_indices_is_the_guests(self):
        self.assertVerdict("guest", "guest kernel crashed", pinblk_log=GOOD_LOG, console_all=OOPS)

    def test_not_a_head_with_consistent_indices_is_the_guests(self):
        self.assertVerdict(
            "guest",
            "is not a head",
            pinblk_log=GOOD_LOG,
            console_all="virtio_blk virtio1: req.0:id 17 is not a head!\n",
        )

    def test_a_checksum_failure_is_pinblks_even_with_a_crash(self):
        self.assertVerdict(
            "pinblk",
            "checksum_failure",
            pinblk_log=GOOD_LOG,
            console_all=OOPS,
            report_jsonl='{"kind":"checksum_failure","block":3}\n',
        )

    def test_a_guest_io_error_is_pinblks(self):
        self.assertVerdict(
            "pinblk",
            "I/O error",
            pinblk_log=GOOD_LOG,
            console_all="blk_update_request: I/O error, dev vda, sector 8\n" + OOPS,
        )

    def test_io_errors_after_not_a_head_follow_from_the_broken_ring(self):
        # As in a CI run: the driver found id 18 not a head, broke the ring,
        # and failed every later request; fio then reported them.
        self.assertVerdict(
            "guest",
            "is not a head",
            pinblk_log=GOOD_LOG,
            console_all=(
                "[    9.067269] virtio_blk virtio0: req.0:id 18 is not a head!\n"
                "[    9.089134] I/O error, dev vda, sector 478856 op 0x1:(WRITE) flags 0x8800\n"
                "fio: io_u error on file /dev/vda: Input/output error: write offset=245174272\n"
            ),
        )

    def test_an_io_error_before_not_a_head_is_pinblks(self):
        self.assertVerdict(
            "pinblk",
            "I/O error",
            pinblk_log=GOOD_LOG,
            console_all=(
                "[    8.1] I/O error, dev vda, sector 8 op 0x1:(WRITE) flags 0x8800\n"
                "[    9.0] virtio_blk virtio0: req.0:id 18 is not a head!\n"
            ),
        )

    def test_not_a_head_with_a_stop_not_completed_is_pinblks(self):
        self.assertVerdict(
            "pinblk",
            "not completed",
            pinblk_log=start(1, 0) + stop(1, 100, used=99),
            console_all=(
                "[    9.0] virtio_blk virtio0: req.0:id 18 is not a head!\n"
                "[    9.1] I/O error, dev vda, sector 8 op 0x1:(WRITE) flags 0x8800\n"
            ),
        )

    def test_a_stop_with_a_request_not_completed_is_pinblks(self):
        log = start(1, 0) + stop(1, 100, used=99) + start(2, 100, used=99)
        self.assertVerdict("pinblk", "not completed or completed twice", pinblk_log=log, console_all=OOPS)

    def test_a_stop_whose_used_idx_in_memory_lags_is_pinblks(self):
        log = start(1, 0) + stop(1, 100, mem_used=98)
        self.assertVerdict("pinblk", "used idx 98", pinblk_log=log, console_all=OOPS)

    def test_a_destination_starting_elsewhere_is_pinblks(self):
        log = start(1, 0) + stop(1, 100) + start(2, 90)
        self.assertVerdict("pinblk", "connection 1 stopped at 100, 100", pinblk_log=log, console_all=OOPS)

    def test_rate_limited_ring_lines_are_pinblks(self):
        log = GOOD_LOG + (
            f"{T}1 more like this suppressed in the last 1 s: connection 2: queue 0 "
            "stopped after draining 0 request(s): next avail 250\n"
        )
        self.assertVerdict("pinblk", "rate-limited", pinblk_log=log, console_all=OOPS)

    def test_a_stall_with_every_completion_seen_is_the_guests(self):
        self.assertVerdict(
            "guest", "used_event = 7239", pinblk_log=GOOD_LOG, stall_txt=QUIET_STALL
        )

    def test_a_stall_with_used_event_behind_is_pinblks(self):
        stall = QUIET_STALL.replace("used_event=7239", "used_event=7236")
        self.assertVerdict("pinblk", "may be waiting on pinblk", pinblk_log=GOOD_LOG, stall_txt=stall)

    def test_a_stall_with_pins_held_is_pinblks(self):
        stall = QUIET_STALL.replace('"inflight_pins": 0', '"inflight_pins": 2')
        self.assertVerdict("pinblk", "may be waiting on pinblk", pinblk_log=GOOD_LOG, stall_txt=stall)

    def test_a_stall_with_the_vcpu_spinning_irqs_off_in_every_sample_is_the_guests(self):
        stall = QUIET_STALL.replace("used_event=7239", "used_event=7236") + spinning("2", "6")
        self.assertVerdict("guest", "interrupts disabled", pinblk_log=GOOD_LOG, stall_txt=stall)

    def test_a_stall_with_interrupts_on_in_one_sample_is_pinblks(self):
        stall = QUIET_STALL.replace("used_event=7239", "used_event=7236") + spinning("2", "246")
        self.assertVerdict("pinblk", "may be waiting on pinblk", pinblk_log=GOOD_LOG, stall_txt=stall)

    def test_a_single_spinning_sample_is_not_enough(self):
        stall = QUIET_STALL.replace("used_event=7239", "used_event=7236") + spinning("2")
        self.assertVerdict("pinblk", "may be waiting on pinblk", pinblk_log=GOOD_LOG, stall_txt=stall)

    def test_no_evidence_is_pinblks(self):
        self.assertVerdict("pinblk", "no evidence", pinblk_log=GOOD_LOG, console_all="fio: timeout\n")


if __name__ == "__main__":
    unittest.main()
