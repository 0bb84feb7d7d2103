"""An aiohttp application served from a thread of its own: the tests' stand-ins for the servers
in front of or beside the agent (Home Assistant's ingress proxy, the Supervisor)."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class ThreadedServer:
    """Serves ``app`` on ``host:port`` (0: a free port) until :meth:`stop`."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = port
        started = threading.Event()
        threading.Thread(target=self._serve, args=(app, host, started), daemon=True).start()
        assert started.wait(10), "the stand-in server did not start"

    def _serve(self, app: web.Application, host: str, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        # A stand-in stops at once: handlers still running (a trickling picture) are cancelled.
        runner = self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, host, self.port)
        self.loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        started.set()
        self.loop.run_forever()

    def stop(self) -> None:
        """Close the listening socket (the port is free again at once), then the loop."""
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
