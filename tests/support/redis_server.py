"""A real redis-server for the fleet tests, on a free port, without persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from support.smtp import free_port
from support.waiting import wait_until

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """redis-server in the foreground on a free port; no persistence (a fleet needs none)."""

    def __init__(self, tmp_path: Path, *options: str) -> None:
        self.options = options
        self.port = free_port()
        self.dir = tmp_path
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        no_persistence = ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                *no_persistence,
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_until(self.answers, 10, "redis-server to answer")
        return self

    def client(self):
        import redis

        password = self.options[-1] if "--requirepass" in self.options else None
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, password=password)

    def answers(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            with self.client() as client:
                return bool(client.ping())
        except OSError:
            return False
        except Exception as exc:  # redis.ConnectionError is not an OSError
            return type(exc).__name__ == "BusyLoadingError"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
