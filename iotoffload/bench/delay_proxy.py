"""A TCP proxy that adds a fixed one-way delay in each direction: extra round-trip time for
the emulated network, since this kernel has no ``netem``.

    python -m iotoffload.bench.delay_proxy --listen 10.201.0.1:18831 \
        --target 10.201.0.1:18830 --delay-ms 10

Each chunk read is held until ``delay`` after it arrived and then written, in order, so the
delay adds latency without limiting throughput (``tbf`` on the link does that). It prints
``ready`` once listening and stops when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while data := await reader.read(65536):
            q.put_nowait((time.monotonic() + delay, data))
        q.put_nowait((0.0, b""))

    async def write() -> None:
        while True:
            due, data = await q.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    await asyncio.gather(read(), write(), return_exceptions=True)


async def serve(listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            tr, tw = await asyncio.open_connection(*target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pipe(cr, tw, delay_s), _pipe(tr, cw, delay_s))

    server = await asyncio.start_server(handle, *listen)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    server.close()


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=_addr, required=True, help="HOST:PORT to accept on")
    p.add_argument("--target", type=_addr, required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay, each way")
    a = p.parse_args()
    asyncio.run(serve(a.listen, a.target, a.delay_ms / 1e3))


if __name__ == "__main__":
    main()
