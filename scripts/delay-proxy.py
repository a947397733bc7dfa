#!/usr/bin/env python3
"""A TCP forwarder that adds a fixed one-way delay to each direction of every connection.

Usage: delay-proxy.py LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS

scripts/bench-net.sh puts it in front of the registry because this machine's kernel has no
netem qdisc: the bandwidth limit is a tbf qdisc on the veth pair, the latency is this. Each
piece of data read from one side is written to the other DELAY_MS after it arrived, in order,
without waiting for the previous piece's delay to pass first, so the delay adds latency and
leaves throughput alone (like a long wire). A new connection waits one round trip before its
first byte, for the TCP handshake it would have had. A bounded queue per direction keeps TCP
flow control working end to end.
"""

import asyncio
import sys
import time

CHUNK = 256 * 1024
QUEUE_ITEMS = 32


async def pump(reader, writer, delay):
    """Copies reader to writer, each piece delayed by `delay` seconds from its arrival."""
    queue = asyncio.Queue(maxsize=QUEUE_ITEMS)

    async def read_side():
        while True:
            try:
                data = await reader.read(CHUNK)
            except (ConnectionError, OSError):
                data = b""
            await queue.put((time.monotonic() + delay, data))
            if not data:
                return

    async def write_side():
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                # The far side went away: drop the rest of this direction.
                while data:
                    _, data = await queue.get()
                return

    await asyncio.gather(read_side(), write_side())


async def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    lhost, lport = sys.argv[1].rsplit(":", 1)
    thost, tport = sys.argv[2].rsplit(":", 1)
    delay = float(sys.argv[3]) / 1000.0

    async def handle(c_reader, c_writer):
        try:
            await asyncio.sleep(2 * delay)
            u_reader, u_writer = await asyncio.open_connection(thost, int(tport))
        except OSError as e:
            print(f"delay-proxy: cannot reach {thost}:{tport}: {e}", file=sys.stderr)
            c_writer.close()
            return
        try:
            await asyncio.gather(pump(c_reader, u_writer, delay), pump(u_reader, c_writer, delay))
        finally:
            for w in (u_writer, c_writer):
                w.close()

    server = await asyncio.start_server(handle, lhost, int(lport), limit=CHUNK)
    async with server:
        await server.serve_forever()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(0)
