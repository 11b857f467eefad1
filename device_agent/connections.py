"""The device's broker connections: one per broker URL, opened once however many callers ask
at the same time.

Owned by the device agent's loop. Connecting (a blocking paho connect) runs on the loop's
executor; concurrent ``ensure`` calls for one broker await the same attempt, so two clients
with the device's client id never open (and kick each other off the broker).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable

from iotoffload.loop import AgentLoop
from iotoffload.transport.link import Link
from iotoffload.transport.mqtt import BrokerAuthError, BrokerUnavailableError
from iotoffload.transport.security import SecurityConfigError

log = logging.getLogger(__name__)


class Connections:
    """Owned by the device agent's loop (``ensure`` and ``link_for`` run there). A link, once
    made, is never replaced: sessions hold it, and a second paho client with the device's
    client id would kick the first off the broker."""

    def __init__(self, loop: AgentLoop, make_link: Callable[[str], Link]) -> None:
        self._loop = loop
        self._make_link = make_link  # a new link for a URL, its subscriptions in place
        self._links: dict[str, Link] = {}
        self._connected_once: set[str] = set()  # paho reconnects these by itself
        self._connecting: dict[str, asyncio.Future[Link]] = {}
        # connects wait up to seconds on a broker that may never answer: their own threads,
        # so they never hold up the loop's executor (block reads of the upload)
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="device-connect")
        self.opened = 0  # links made over the agent's life (a test counts them)

    def get(self, url: str) -> Link | None:
        return self._links.get(url)

    def link_for(self, url: str) -> Link:
        """The link to ``url``, made (not connected) when first needed."""
        link = self._links.get(url)
        if link is None:
            link = self._make_link(url)
            self._links[url] = link
            self.opened += 1
        return link

    def _connect(self, url: str, link: Link, timeout: float) -> None:
        """On a connect thread: a first connect, or a wait for paho's own reconnect."""
        if url not in self._connected_once:
            link.connect(timeout)
        elif not link.wait_connected(timeout):
            raise BrokerUnavailableError(f"broker {url} still unreachable (reconnecting)")

    async def ensure(self, url: str, timeout: float = 5.0) -> Link:
        """A connected link to ``url``; raises BrokerUnavailableError when the broker cannot
        be reached (the link stays: a later call tries again on the same one) and
        BrokerAuthError when it and this device do not trust each other."""
        link = self.link_for(url)
        if link.connected:
            return link
        pending = self._connecting.get(url)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Link] = asyncio.get_running_loop().create_future()
        self._connecting[url] = fut
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._pool, self._connect, url, link, timeout
            )
        except BaseException as e:
            if isinstance(e, BrokerUnavailableError | BrokerAuthError):
                fut.set_exception(e)
                fut.exception()  # retrieved: no "never retrieved" warning if nobody waits
            else:  # cancelled (the agent closes): so are the callers waiting with us
                fut.cancel()
            raise
        finally:
            del self._connecting[url]
        self._connected_once.add(url)
        fut.set_result(link)
        return link

    async def try_ensure(self, url: str, timeout: float = 5.0) -> Link | None:
        try:
            return await self.ensure(url, timeout)
        except BrokerUnavailableError as e:
            log.warning("%s", e)
            return None
        except BrokerAuthError as e:  # an edge on a broker we cannot log in to: not a candidate
            log.error("%s", e)
            return None
        except SecurityConfigError as e:  # e.g. a plain URL for credentials that need TLS
            log.error("not connecting to %s: %s", url, e)
            return None

    def close_all(self) -> None:
        """Close every link (blocking: joins paho's threads). Not on the loop thread."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
