"""A slow link for hosts where ``tc netem`` is missing: a TCP proxy that delays each chunk.

``python fleet_proxy.py <listen address> <listen port> <target address> <target port> <ms>
<jitter ms>`` forwards every connection to the target and holds each chunk, in both
directions, for ``ms ± jitter`` milliseconds (in order: a later chunk never overtakes an
earlier one), like a link with that one-way latency.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, jitter: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def sender() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(sender())
    last = 0.0
    try:
        while True:
            chunk = await reader.read(65536)
            due = max(last, time.monotonic() + max(0.0, delay + random.uniform(-jitter, jitter)))
            last = due
            await queue.put((due, chunk))
            if not chunk:
                break
    except (ConnectionError, OSError):
        await queue.put((0.0, b""))
    await task


async def main(listen: str, port: int, target: str, target_port: int, ms: float, jitter_ms: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(target, target_port)
        except OSError:
            writer.close()
            return
        delay, jitter = ms / 1000, jitter_ms / 1000
        await asyncio.gather(
            pipe(reader, upstream_writer, delay, jitter),
            pipe(upstream_reader, writer, delay, jitter),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, listen, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0], int(a[1]), a[2], int(a[3]), float(a[4]), float(a[5])))
