"""The typed surface is tested like behaviour: mypy infers what users expect from bind()."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

USER_CODE = textwrap.dedent(
    """
    import attrs

    from outboxbind import JsonCodec, OutboxEntry, bind
    from outboxbind.topics.memory import InMemoryTopic


    @attrs.frozen
    class OrderPlaced:
        order_id: int


    orders = InMemoryTopic("orders", JsonCodec(OrderPlaced))


    def persist(entry: OutboxEntry) -> str:
        return "1"


    async def persist_async(entry: OutboxEntry) -> str:
        return "1"


    reveal_type(bind(orders, persist))
    reveal_type(bind(orders, persist_async))
    reveal_type(bind(orders, persist).publish(OrderPlaced(1)))


    async def publish_async() -> None:
        reveal_type(await bind(orders, persist_async).publish(OrderPlaced(1)))


    bind(orders, persist).publish("not an order")
    """
)


@pytest.mark.slow
def test_bind_keeps_the_topics_message_type(tmp_path: Path) -> None:
    source = tmp_path / "user_code.py"
    source.write_text(USER_CODE)
    root = Path(__file__).resolve().parent.parent
    out, _, _ = mypy_api.run(
        ["--strict", "--no-error-summary", "--cache-dir", str(root / ".mypy_cache"), str(source)]
    )
    lines = [line.split(": ", 1)[1] for line in out.splitlines() if ": " in line]
    assert lines == [
        'note: Revealed type is "outboxbind.binding.BoundTopic[user_code.OrderPlaced]"',
        'note: Revealed type is "outboxbind.binding.AsyncBoundTopic[user_code.OrderPlaced]"',
        'note: Revealed type is "str"',
        'note: Revealed type is "str"',
        'error: Argument 1 to "publish" of "BoundTopic" has incompatible type "str"; '
        'expected "OrderPlaced"  [arg-type]',
    ], out
