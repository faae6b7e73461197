"""`make demo`: a real relay between a real client and a real sink, then its log.

Starts aiosmtpd's debugging server as the upstream sink, `smarthost serve` with
examples/demo.toml, sends one message through the relay with smtplib, waits until
the sink has it, stops both cleanly and prints the message's life from the JSON log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from email.utils import make_msgid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "demo-run")
RELAY = ("127.0.0.1", 10025)
SINK = ("127.0.0.1", 10026)
SMARTHOST = os.path.join(os.path.dirname(sys.executable), "smarthost")


def wait_for(predicate, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def port_open(address) -> bool:
    with socket.socket() as s:
        return s.connect_ex(address) == 0


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def log_records(path: str) -> list[dict]:
    records = []
    for line in read(path).splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            print(f"  (not JSON) {line}")
    return records


def main() -> int:
    os.chdir(ROOT)
    shutil.rmtree(RUN, ignore_errors=True)
    os.makedirs(RUN)
    for address in (RELAY, SINK):
        if port_open(address):
            raise SystemExit(f"demo: {address[0]}:{address[1]} is already in use")
    sink_out = open(os.path.join(RUN, "sink.txt"), "w")  # noqa: SIM115
    relay_log = open(os.path.join(RUN, "smarthost.log"), "w")  # noqa: SIM115
    print(f"1. upstream sink: python -m aiosmtpd -n -l {SINK[0]}:{SINK[1]}")
    sink = subprocess.Popen(
        [sys.executable, "-u", "-m", "aiosmtpd", "-n", "-l", f"{SINK[0]}:{SINK[1]}"],
        stdout=sink_out,
        stderr=subprocess.STDOUT,
    )
    relay = None
    try:
        wait_for(lambda: port_open(SINK), "the sink to listen")
        print("2. relay: smarthost -c examples/demo.toml serve")
        relay = subprocess.Popen([SMARTHOST, "-c", "examples/demo.toml", "serve"], stderr=relay_log)
        wait_for(lambda: '"started"' in read(relay_log.name), "the relay to start")
        message_id = make_msgid(domain="demo.smarthost.test")
        msg = EmailMessage()
        msg["From"] = "cron@demo.smarthost.test"
        msg["To"] = "admin@example.com"
        msg["Subject"] = "Hello through smarthost"
        msg["Message-ID"] = message_id
        msg.set_content("If you can read this, the relay spooled it and forwarded it.\n")
        with smtplib.SMTP(*RELAY) as client:
            client.send_message(msg)
            reply = client.noop()
        print(f"3. sent {message_id} through {RELAY[0]}:{RELAY[1]}")
        wait_for(lambda: message_id in read(sink_out.name), "the message at the sink")
        print("4. the sink received it:\n")
        for line in read(sink_out.name).splitlines():
            print(f"   | {line}")
        del reply
    finally:
        if relay is not None:
            relay.send_signal(signal.SIGTERM)
            code = relay.wait(15)
            print(f"\n5. relay stopped with SIGTERM, exit status {code}")
        sink.terminate()
        sink.wait(15)
        sink_out.close()
        relay_log.close()
    records = log_records(relay_log.name)
    queue_ids = {r.get("queue_id") for r in records if r.get("message_id") == message_id}
    print("\n6. its life in the JSON log (jq 'select(.queue_id == \"ID\")'):\n")
    for record in records:
        if record.get("queue_id") in queue_ids or record.get("event") in (
            "started",
            "stopping",
            "stopped",
        ):
            print("   " + json.dumps(record))
    delivered = any(r.get("event") == "delivered" for r in records)
    print("\ndemo: OK" if delivered and code == 0 else "\ndemo: FAILED")
    return 0 if delivered and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
