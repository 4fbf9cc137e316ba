#!/usr/bin/env python3
"""systemd notify protocol of cogvlm-server, checked with a socket of our own.

Run 1: NOTIFY_SOCKET = a filesystem unix datagram socket owned by this script,
WATCHDOG_USEC = 1 s. Expects: WATCHDOG=1 keep-alives (before READY too: the loop answers
while the model loads) at about half the interval; READY=1 (with STATUS=) only after the
model is loaded (/health is 200 by then); every datagram from the server's own PID (kernel
credentials, as systemd's NotifyAccess=main checks); on SIGTERM, STOPPING=1, no READY=1
after it, exit status 0.
Run 2: an abstract-namespace socket ("@name"), WATCHDOG_PID naming another process: READY=1
and STOPPING=1 arrive, no WATCHDOG=1 (the watchdog is meant for someone else).
Run 3: no NOTIFY_SOCKET: the server starts, serves and stops as usual (notify is a no-op).

Exit 0 when everything holds; otherwise prints what failed and exits 1. About 10 s.
"""
import os
import select
import shutil
import signal
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploylib as dl  # noqa: E402

F = dl.Failures("test_notify")


class Listener:
    """A unix datagram socket collecting (time, sender pid, message) in a thread."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.msgs = []
        self.lock = threading.Lock()
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        credsz = struct.calcsize("3i")
        while not self.stop:
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if not r:
                continue
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(credsz))
            pid = None
            for level, typ, cd in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", cd[:credsz])[0]
            with self.lock:
                self.msgs.append((time.monotonic(), pid, data.decode(errors="replace")))

    def snapshot(self):
        with self.lock:
            return list(self.msgs)

    def wait_for(self, line, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for m in self.snapshot():
                if line in m[2].split("\n"):
                    return m
            time.sleep(0.02)
        return None

    def close(self):
        self.stop = True
        self.t.join(2)
        self.sock.close()


def wait_ready_msg(lst, srv, timeout=60):
    """READY=1 from lst; gives up 5 s after the server's /health said 200 without it."""
    end = time.monotonic() + timeout
    healthy = False
    while time.monotonic() < end:
        m = lst.wait_for("READY=1", 0.2)
        if m:
            return m
        if srv.proc.poll() is not None:
            return None
        if not healthy:
            try:
                if srv.port is None:
                    srv.wait_listening(timeout)
                healthy = dl.request(srv.port, "GET", "/health", timeout=2)[0] == 200
            except (OSError, RuntimeError):
                pass
            if healthy:
                end = min(end, time.monotonic() + 5)
    return None


def lines(msgs, line):
    return [m for m in msgs if line in m[2].split("\n")]


def run_watchdog(work):
    path = os.path.join(work, "notify.sock")
    lst = Listener(path)
    srv = dl.Server(work, "notify-1", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    try:
        ready = wait_ready_msg(lst, srv)
        if not F.check(ready is not None, "run 1: no READY=1 (model loaded, /health 200)"):
            print(srv.log_text()[-2000:], file=sys.stderr)
            return
        # READY=1 is sent right after the model is loaded: /health must say ok now
        srv.wait_listening(5)
        st, _, body = dl.request(srv.port, "GET", "/health", timeout=5)
        F.check(st == 200, f"run 1: /health after READY=1 is {st} {body[:100]!r}")
        F.check(any(l.startswith("STATUS=") for l in ready[2].split("\n")),
                f"run 1: READY=1 datagram without STATUS=: {ready[2]!r}")
        time.sleep(2.2)  # ~5 keep-alives at 0.5 s
        msgs = lst.snapshot()
        wd = lines(msgs, "WATCHDOG=1")
        F.check(len(wd) >= 4, f"run 1: {len(wd)} WATCHDOG=1 in ~2.3 s with WATCHDOG_USEC=1 s")
        F.check(wd and wd[0][0] <= ready[0],
                "run 1: no WATCHDOG=1 before READY=1 (the first keep-alive is sent at start)")
        gaps = [b[0] - a[0] for a, b in zip(wd, wd[1:])]
        F.check(gaps and max(gaps) < 1.0 and min(gaps) > 0.3,
                f"run 1: keep-alive gaps {['%.3f' % g for g in gaps]}: want about 0.5 s "
                f"(half of WATCHDOG_USEC), all below 1 s")
        # a generation works while notifying
        st, _, body = dl.request(srv.port, "POST", "/v1/chat/completions", {
            "model": dl.MODEL_ID, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        F.check(st == 200, f"run 1: chat completion {st} {body[:200]!r}")
        srv.signal(signal.SIGTERM)
        stop = lst.wait_for("STOPPING=1", 10)
        F.check(stop is not None, "run 1: no STOPPING=1 within 10 s of SIGTERM")
        rc = srv.wait(30)
        F.check(rc == 0, f"run 1: exit status {rc} after SIGTERM (want 0)")
        msgs = lst.snapshot()
        pids = {m[1] for m in msgs}
        F.check(pids == {srv.pid}, f"run 1: sender pids {pids}, want only {srv.pid}")
        F.check(len(lines(msgs, "READY=1")) == 1,
                f"run 1: {len(lines(msgs, 'READY=1'))} READY=1 messages (want 1)")
        if stop:
            F.check(stop[0] > ready[0], "run 1: STOPPING=1 before READY=1")
            F.check(not [m for m in lines(msgs, "READY=1") if m[0] > stop[0]],
                    "run 1: READY=1 after STOPPING=1")
        for m in msgs:
            for l in m[2].split("\n"):
                F.check(l.split("=", 1)[0] in ("READY", "STOPPING", "STATUS", "WATCHDOG")
                        and "=" in l, f"run 1: unexpected notify line {l!r}")
    finally:
        srv.kill()
        lst.close()


def run_abstract(work):
    name = f"@cogvlm-notify-test-{os.getpid()}"
    lst = Listener("\0" + name[1:])
    srv = dl.Server(work, "notify-2", env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000",
                                           "WATCHDOG_PID": "1"})
    try:
        ready = wait_ready_msg(lst, srv)
        F.check(ready is not None, "run 2 (abstract socket): no READY=1 (model loaded)")
        time.sleep(0.5)
        srv.signal(signal.SIGTERM)
        F.check(lst.wait_for("STOPPING=1", 10) is not None,
                "run 2 (abstract socket): no STOPPING=1 after SIGTERM")
        rc = srv.wait(30)
        F.check(rc == 0, f"run 2: exit status {rc} after SIGTERM (want 0)")
        wd = lines(lst.snapshot(), "WATCHDOG=1")
        F.check(not wd, f"run 2: {len(wd)} WATCHDOG=1 although WATCHDOG_PID is another process")
    finally:
        srv.kill()
        lst.close()


def run_plain(work):
    srv = dl.Server(work, "notify-3")
    try:
        srv.wait_ready(60)
        srv.signal(signal.SIGTERM)
        rc = srv.wait(30)
        F.check(rc == 0, f"run 3 (no NOTIFY_SOCKET): exit status {rc} after SIGTERM")
    except RuntimeError as e:
        F.check(False, f"run 3 (no NOTIFY_SOCKET): {e}")
    finally:
        srv.kill()


def main():
    dl.install_sigterm_exit(deadline_s=150)
    if not dl.SERVER_BIN.exists():
        print(f"test_notify: {dl.SERVER_BIN} not built (run make)", file=sys.stderr)
        return 2
    work = dl.tempdir("cogvlm-notify-")
    try:
        run_watchdog(work)
        run_abstract(work)
        run_plain(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return F.report()


if __name__ == "__main__":
    sys.exit(main())
