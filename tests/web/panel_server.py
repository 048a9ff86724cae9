"""A stand-in for ComfyUI's server for the panel's browser tests (and for `panel_screenshot.py`).

One real aiohttp app in a background thread serves: the pack's real `/sa3/...` routes (also under `/api/...`, as
ComfyUI mirrors them) over a real `TrainingManager`; `web/` under `/extensions/sa3_lora_studio/`; stub
`/scripts/app.js` and `/scripts/api.js` (tests/web/stubs) standing in for ComfyUI's frontend modules; a `/ws`
websocket that forwards every run event as `{"type": "sa3.<type>", "data": event}`, as `PromptServer.send_sync` does.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from pathlib import Path

from aiohttp import WSMsgType, web
from recorded_run import write_checkpoint
from sa3_lora_studio.nodes.routes import route_table
from sa3_lora_studio.training.manager import TrainingManager

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WEB_DIR = REPO / "web"
PACK_FOLDER = "sa3_lora_studio"


class ReplayManager(TrainingManager):
    """The real manager with its trainer replaced by a job that writes the events the test feeds it, and obeys the
    run controls the way the trainer does (status paused/training, checkpoint on save and on stop)."""

    def __init__(self, root, **kwargs):
        self.feeds: dict[str, queue.Queue] = {}
        super().__init__(root, runs_per_device=8, **kwargs)

    def feed(self, run_id: str) -> queue.Queue:
        return self.feeds.setdefault(run_id, queue.Queue())

    def _run_job(self, run_id, control):
        log, registry = self.event_log(run_id), self.registry
        step = registry.get(run_id).get("step", 0)
        feed = self.feed(run_id)

        def set_status(status):
            registry.update(run_id, status=status)
            log.emit("status", status=status)

        def checkpoint():
            rel = write_checkpoint(registry.run_dir(run_id), registry.get(run_id)["name"], step)
            log.emit("checkpoint", step=step, path=rel, state_path=rel.replace(".safetensors", ".state.pt"))

        set_status("training")
        while True:
            if control.stop.is_set():
                checkpoint()
                set_status("stopped")
                return
            if control.paused:
                control.wait_while_paused(on_pause=lambda: set_status("paused"),
                                          on_resume=lambda: set_status("training"))
                continue
            if control.save_now.is_set():
                control.save_now.clear()
                checkpoint()
            try:
                item = dict(feed.get(timeout=0.02))
            except queue.Empty:
                continue
            kind = item.pop("type")
            if kind == "step":
                step = item["step"]
                registry.update(run_id, step=step)
            log.emit(kind, **item)


class PanelServer:
    """The app on 127.0.0.1:<free port> in a thread. `url` is its base; `.manager` the ReplayManager."""

    def __init__(self, runs_root: Path, manager: TrainingManager | None = None):
        self.manager = manager or ReplayManager(runs_root)
        self.manager.listeners.append(self.broadcast)
        self.sockets: set[web.WebSocketResponse] = set()
        self.accept_sockets = True
        self.requests: list[tuple[str, str]] = []  # (method, path) of every /sa3 request, for assertions
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="panel-server", daemon=True)

    def _app(self) -> web.Application:
        @web.middleware
        async def record(request, handler):
            if "/sa3/" in request.path:
                self.requests.append((request.method, request.path_qs))
            return await handler(request)

        app = web.Application(middlewares=[record])
        for method, path, handler in route_table(lambda: self.manager):
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.router.add_get("/ws", self._websocket)
        async def index(request):
            return web.FileResponse(HERE / "index.html")

        app.router.add_get("/", index)
        app.router.add_static("/scripts/", HERE / "stubs")
        app.router.add_static(f"/extensions/{PACK_FOLDER}/", WEB_DIR)
        return app

    async def _websocket(self, request):
        if not self.accept_sockets:
            return web.Response(status=503, text="websocket refused by the test")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.sockets.discard(ws)
        return ws

    def _main(self):
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self._app(), access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> PanelServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def broadcast(self, event: dict) -> None:
        """Manager listener (any thread): what ComfyUI's send_sync does for `sa3.<type>`."""
        message = json.dumps({"type": f"sa3.{event['type']}", "data": event})

        async def send():
            for ws in list(self.sockets):
                try:
                    await ws.send_str(message)
                except ConnectionError:
                    self.sockets.discard(ws)

        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(send()))

    def drop_sockets(self) -> None:
        """Close every websocket (the browser sees a dropped connection and reconnects when allowed)."""

        async def close():
            for ws in list(self.sockets):
                await ws.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)

    def wait_for_sockets(self, n: int = 1, timeout: float = 10) -> None:
        deadline = time.time() + timeout
        while len(self.sockets) < n:
            if time.time() > deadline:
                raise TimeoutError(f"{len(self.sockets)} websocket(s) connected, expected {n}")
            time.sleep(0.02)

    def stop(self) -> None:
        for control in self.manager.worker.controls.values():
            control.request_stop()
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
