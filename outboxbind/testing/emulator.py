"""The Google Pub/Sub emulator, started and stopped from tests (yours and ours).

    emulator = PubSubEmulator().start()          # a free port on 127.0.0.1
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host   # before creating clients
    ...
    emulator.stop()

Needs the Google Cloud SDK's emulator (``gcloud beta emulators pubsub``) and Java.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

__all__ = ["PubSubEmulator", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PubSubEmulator:
    """The Google Pub/Sub emulator, run by the suite in its own process group.

    The gcloud wrapper starts a Java child; signals go to the whole group, so stopping it
    leaves no Java process holding the port. ``pause``/``resume`` freeze and thaw it (SIGSTOP,
    SIGCONT): an outage in which the emulator keeps its topics and messages.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> PubSubEmulator:
        """Start it and wait until it listens; raise with the reason if it cannot."""
        if shutil.which("gcloud") is None:
            raise RuntimeError("the Pub/Sub emulator is needed: install the Google Cloud SDK")
        self.process = subprocess.Popen(
            ["gcloud", "beta", "emulators", "pubsub", "start",
             f"--host-port={self.host}", "--project=test"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Pub/Sub emulator exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the Pub/Sub emulator did not listen on {self.host} in {timeout}s")

    def _signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def pause(self) -> None:
        """Freeze it (SIGSTOP): it stops answering but keeps its state."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw it (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the whole process group, the Java child included."""
        if self.process is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):  # the Java child may outlive the wrapper
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None
