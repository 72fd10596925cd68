#!/usr/bin/env python3
"""guest-tests/qmp.py -- send one QMP command to a running QEMU.

Usage: qmp.py SOCKET COMMAND [JSON-ARGUMENTS]

Connects to the QMP unix socket SOCKET (QEMU started with
-qmp unix:SOCKET,server=on,wait=off), negotiates capabilities, runs COMMAND
with the JSON object JSON-ARGUMENTS (if given) and prints its "return" value
as one JSON line. Asynchronous events QEMU sends meanwhile are skipped.
Exit status 0 on success, 1 if QEMU answered with an error (printed on
stderr), 2 on usage or connection errors. `quit` succeeds also when QEMU
closes the socket before answering. Python 3 standard library only.
"""

import json
import socket
import sys


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    path, command = sys.argv[1], sys.argv[2]
    args = json.loads(sys.argv[3]) if len(sys.argv) == 4 else None
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(path)
    except OSError as e:
        print(f"qmp: cannot connect to {path}: {e}", file=sys.stderr)
        return 2
    f = s.makefile("rw", encoding="utf-8")

    def reply():
        """The next answer (not an event); None if QEMU closed the socket."""
        while True:
            line = f.readline()
            if not line:
                return None
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    greeting = f.readline()
    if not greeting:
        print("qmp: no greeting", file=sys.stderr)
        return 2
    for cmd in ({"execute": "qmp_capabilities"}, {"execute": command}):
        if cmd["execute"] == command and args is not None:
            cmd["arguments"] = args
        f.write(json.dumps(cmd) + "\n")
        f.flush()
        msg = reply()
        if msg is None:
            if command == "quit":
                return 0
            print(f"qmp: connection closed during {cmd['execute']}", file=sys.stderr)
            return 2
        if "error" in msg:
            print(f"qmp: {cmd['execute']}: {json.dumps(msg['error'])}", file=sys.stderr)
            return 1
    print(json.dumps(msg.get("return")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
