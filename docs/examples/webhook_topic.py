"""A destination of your own: a Topic subclass that POSTs each message to a webhook."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import closing
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

from outboxbind import BytesCodec, Codec, PersistedMessage, Relay, UnpublishableError, bind
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics import PublishOutcome, Topic, publish_in_key_order


class WebhookTopic(Topic[Any]):
    """POSTs each message's bytes to ``url``, with the outbox id as the idempotency key."""

    def __init__(self, name: str, codec: Codec[Any], url: str) -> None:
        super().__init__(name, codec)
        self.url = url

    def publish(self, message: Any, *, attributes: Mapping[str, str] | None = None) -> str:
        entry = self.make_entry(message, attributes=attributes)  # the same checks as bind()
        return self._post(entry.data, dict(entry.attributes))

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        # One at a time, in order; after a failure, that key's later messages are not sent.
        return publish_in_key_order(
            messages,
            lambda m: self._post(m.data, {**m.attributes, "Idempotency-Key": m.id}, timeout),
        )

    def _post(self, data: bytes, headers: dict[str, str], timeout: float = 10.0) -> str:
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return str(response.headers.get("X-Delivery-Id", ""))
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise UnpublishableError(f"{self.url} refused it: HTTP {exc.code}") from exc
            raise  # 5xx, 408, 429: retried by the relay


class Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, bytes]]] = []  # (idempotency key, body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.headers["Idempotency-Key"], body))
        self.send_response(202)
        self.send_header("X-Delivery-Id", f"delivery-{len(self.received)}")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the example's output quiet


def main() -> None:
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hooks = WebhookTopic("hooks", BytesCodec(), f"http://127.0.0.1:{server.server_port}/in")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "app.db"
            with closing(SQLiteStore(path)) as store, closing(sqlite3.connect(path)) as conn:
                with conn:
                    outbox = bind(hooks, persister(conn))
                    ids = [outbox.publish(b'{"event": %d}' % n) for n in range(3)]
                relay = Relay(store)
                relay.register_topic(hooks)
                assert relay.process_messages().successes == 3
    finally:
        server.shutdown()
        server.server_close()
    assert Receiver.received == [(i, b'{"event": %d}' % n) for n, i in enumerate(ids)]
    print(Receiver.received)


if __name__ == "__main__":
    main()
