"""The server's end-of-turn writer (``app.TurnWriter``): answers held to the end of an
event-loop turn go out before the work registered for after them."""

from __future__ import annotations

import asyncio

from gateway.app import TurnWriter


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False


async def test_work_after_the_answer_runs_once_it_is_written() -> None:
    """A login's callback leaves work for the browser's next request (the page's policy and
    headers, the next ticket); scheduled with call_soon it ran before the answer was written
    at the end of the turn. Registered with after_answer it runs after, in order."""
    loop = asyncio.get_running_loop()
    turn = TurnWriter(loop)
    transport = Transport()
    seen: list[tuple[str, list[bytes]]] = []
    turn.after_answer(lambda: seen.append(("first", list(transport.written))))
    turn.add(transport, b"HTTP/1.1 302 Found\r\n\r\n")
    turn.after_answer(lambda: seen.append(("second", list(transport.written))))
    assert transport.written == []
    for _ in range(3):
        await asyncio.sleep(0)
    assert seen == [("first", [b"HTTP/1.1 302 Found\r\n\r\n"]),
                    ("second", [b"HTTP/1.1 302 Found\r\n\r\n"])]


async def test_work_after_a_turn_without_answers_still_runs() -> None:
    loop = asyncio.get_running_loop()
    turn = TurnWriter(loop)
    done = asyncio.Event()
    turn.after_answer(done.set)
    await asyncio.wait_for(done.wait(), 1)
