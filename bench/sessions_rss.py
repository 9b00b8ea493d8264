"""RSS per session in the memory store: ``python -m bench.sessions_rss --count N < session``.

Run by the bench in a fresh process. It reads one real session's plaintext (the
``dump_session`` JSON of the run's own login, from stdin: tokens never appear on a command line
or in output), imports the gateway as ``gateway run`` does, then creates ``N`` sessions exactly
as a login does (``new_ticket`` → ``pack_session`` → ``seal`` → ``MemoryStore.set`` with the
session's TTL), each with its own id, secret and nonce. It prints one JSON line: RSS before and
after (from /proc/self/status), and the sealed blob size. The difference divided by ``N`` is
what one more signed-in user costs a ``store: memory`` gateway.

Done in-process rather than through HTTP logins because 100,000 logins against the test
provider would take about half an hour; the code path that stores a session is the same.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import secrets
import sys
import time

from bench.harness import proc_status_kib
from gateway.sessions import load_session, new_ticket, pack_session, seal, store_ttl
from gateway.store import MemoryStore

LIFETIME = 12 * 3600.0
IDLE_TIMEOUT = 3600.0


def _rss_kib() -> int:
    value = proc_status_kib(os.getpid(), "VmRSS")
    if value is None:
        raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")
    return value


async def _fill(plain: bytes, count: int) -> dict[str, float]:
    template = load_session(plain)
    store = MemoryStore()
    server_key = secrets.token_bytes(32)
    blob_bytes = 0
    gc.collect()
    before = _rss_kib()
    started = time.perf_counter()
    for _ in range(count):
        now = time.time()
        ticket = new_ticket(secrets.token_bytes)
        session = dataclasses.replace(template, created_at=now, last_seen=now,
                                      expires_at=now + LIFETIME)
        key = f"s:{ticket.session_id}"
        blob = seal(pack_session(session), key=server_key, secret=ticket.secret,
                    aad=key.encode(), nonce_bytes=secrets.token_bytes(12))
        blob_bytes += len(blob)
        await store.set(key, blob, store_ttl(session, now=now, idle_timeout=IDLE_TIMEOUT))
    elapsed = time.perf_counter() - started
    gc.collect()
    after = _rss_kib()
    if len(store) != count:
        raise RuntimeError(f"the store holds {len(store)} sessions, expected {count}")
    return {"count": count, "rss_before_kib": before, "rss_after_kib": after,
            "blob_bytes": blob_bytes / max(count, 1), "seconds": round(elapsed, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 2_000_000:
        parser.error("--count must be 1..2000000")
    import gateway.app  # noqa: F401 - the gateway's own imports, so the baseline is a gateway's

    plain = sys.stdin.buffer.read()
    print(json.dumps(asyncio.run(_fill(plain, args.count))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
