"""HTTP routes under /sa3/… on ComfyUI's own aiohttp server (no new listening socket).

`route_table(get_manager)` returns plain aiohttp handlers so tests mount them on a real aiohttp app; inside ComfyUI
`register_routes()` adds them to `PromptServer.instance.routes`. Every file path a route takes is confined to the
run's folder by `RunRegistry.run_file` (no `..`, no absolute paths, no symlinks leaving the folder).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
from collections.abc import Callable

from aiohttp import web

from ..training.events import loss_by_timestep, metrics_csv, read_all_events, read_events, thinned
from ..training.runs import PathOutsideRun, RunConflict, RunError, RunNotFound

MAX_OFFSET = 1 << 60  # byte offsets into events.jsonl; larger ones cannot be seeked to


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _run_error(e: RunError) -> web.Response:
    """The HTTP status of a RunError by its kind: 404 not found, 409 refused by the run's state, 403 a path that
    leaves the runs folder, 400 otherwise."""
    status = 404 if isinstance(e, RunNotFound) else 409 if isinstance(e, RunConflict) else \
        403 if isinstance(e, PathOutsideRun) else 400
    return _error(status, str(e))


def _int_query(request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter in [low, high]; RunError (400) naming it otherwise."""
    raw = request.query.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise RunError(f"{name}={raw!r} must be an integer") from None
    if not low <= value <= high:
        raise RunError(f"{name}={value} must be between {low} and {high}")
    return value


async def _off_loop(work: Callable[[], object]):
    """work() on a worker thread: reading and summing up a long run's events (100 000 steps: some 40 MB) takes
    seconds, and on ComfyUI's event loop it would stall every other request and the websocket meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(None, work)


def route_table(get_manager: Callable[[], object]) -> list[tuple[str, str, Callable]]:
    async def list_runs(request):
        manager = get_manager()
        runs = manager.registry.list()
        for run in runs:
            run["latest_checkpoint"] = manager.registry.latest_checkpoint(run["id"])
        return web.json_response({"runs": runs})

    async def get_run(request):
        manager = get_manager()
        run_id = request.match_info["run_id"]
        try:
            record = manager.registry.get(run_id)
        except RunError as e:
            return _run_error(e)
        try:
            config, config_error = manager.registry.config(run_id).to_dict(), None
        except RunError as e:  # a damaged or missing config.json: the run is still there, and says why
            config, config_error = None, str(e)
        latest = manager.registry.latest_checkpoint(run_id)
        return web.json_response({"run": {**record, "latest_checkpoint": latest}, "config": config,
                                  "latest_checkpoint": latest,  # in the record too, as /sa3/runs lists it
                                  **({"config_error": config_error} if config_error else {})})

    async def get_events(request):
        manager = get_manager()
        try:
            path = manager.registry.run_dir(request.match_info["run_id"]) / "events.jsonl"
            offset = _int_query(request, "offset", 0, 0, MAX_OFFSET)
        except RunError as e:
            return _run_error(e)
        body = await _off_loop(lambda: json.dumps(dict(zip(("events", "offset"), read_events(path, offset)))))
        return web.Response(text=body, content_type="application/json")

    async def get_loss_by_timestep(request):
        manager = get_manager()
        try:
            path = manager.registry.run_dir(request.match_info["run_id"]) / "events.jsonl"
            bins = _int_query(request, "bins", 5, 1, 20)
            points = _int_query(request, "points", 0, 0, 10_000_000)  # per bin; 0: every sample
        except RunError as e:
            return _run_error(e)
        if points == 1:
            return _error(400, "points=1 must be 0 (every sample) or at least 2 (the first and the last)")

        def answer() -> str:
            series = loss_by_timestep(read_all_events(path), bins)
            return json.dumps({"bins": thinned(series, points) if points else series})
        body = await _off_loop(answer)
        return web.Response(text=body, content_type="application/json")

    async def get_metrics_csv(request):
        manager = get_manager()
        run_id = request.match_info["run_id"]
        try:
            path = manager.events_path(run_id)
        except RunError as e:
            return _run_error(e)
        text = await _off_loop(lambda: metrics_csv(read_all_events(path)))
        return web.Response(text=text, content_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="{run_id}-metrics.csv"'})

    async def get_file(request):
        manager = get_manager()
        if not request.query.get("path"):
            return _error(400, "give the file as ?path=, relative to the run's folder (e.g. ?path=demos/...)")
        try:
            path = manager.registry.run_file(request.match_info["run_id"], request.query["path"])
        except RunError as e:
            return _run_error(e)
        headers = {}
        if request.query.get("download"):
            headers["Content-Disposition"] = f'attachment; filename="{path.name}"'
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return web.FileResponse(path, headers={**headers, "Content-Type": ctype})

    async def control(request):
        manager = get_manager()
        run_id, action = request.match_info["run_id"], request.match_info["action"]
        body = {}
        if request.can_read_body:
            try:
                body = json.loads(await request.read() or b"{}")
            except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
                return _error(400, "the request body must be a JSON object, e.g. {\"confirm\": true}")
            if not isinstance(body, dict):
                return _error(400, "the request body must be a JSON object, e.g. {\"confirm\": true}")
        try:  # off the event loop: a control call touches files and must never stall ComfyUI's server
            result = await _off_loop(lambda: manager.control(run_id, action, confirm=body.get("confirm") is True,
                                                             changes=body.get("changes"),
                                                             more_steps=body.get("more_steps", 0)))
        except RunError as e:
            return _run_error(e)
        return web.json_response({"ok": True, "run": result})

    async def loaded_models(request):
        from .model_nodes import loaded_models as cached

        return web.json_response({"models": [list(map(str, key)) for key in cached()]})

    async def unload_models(request):
        from .model_nodes import unload_idle

        # off the event loop: moving a GPU model's weights to host memory takes seconds
        report = await _off_loop(unload_idle)
        return web.json_response({"unloaded": report.unloaded, "offloaded": report.offloaded, "kept": report.kept,
                                  "summary": report.summary()})

    table = [
        ("GET", "/sa3/runs", list_runs),
        ("GET", "/sa3/runs/{run_id}", get_run),
        ("GET", "/sa3/runs/{run_id}/events", get_events),
        ("GET", "/sa3/runs/{run_id}/loss_by_timestep", get_loss_by_timestep),
        ("GET", "/sa3/runs/{run_id}/file", get_file),
        ("GET", "/sa3/runs/{run_id}/metrics.csv", get_metrics_csv),
        ("POST", "/sa3/runs/{run_id}/{action}", control),
        ("GET", "/sa3/models", loaded_models),
        ("POST", "/sa3/models/unload", unload_models),
    ]
    return [(method, path, _setting_errors_answered(handler)) for method, path, handler in table]


def _setting_errors_answered(handler: Callable) -> Callable:
    """handler, with a process setting the runs cannot start with (`SettingsError`, e.g. SA3_RUNS_PER_DEVICE=0)
    answered as a JSON 500 that names it, instead of aiohttp's bare 'Server got itself in trouble'."""
    from .training_nodes import SettingsError

    async def answered(request):
        try:
            return await handler(request)
        except SettingsError as e:
            return _error(500, str(e))
    return answered


def add_routes(router, get_manager) -> None:
    """Add the table to an aiohttp router or a `web.RouteTableDef`-like object with `.get`/`.post` decorators."""
    for method, path, handler in route_table(get_manager):
        if hasattr(router, "add_route"):
            router.add_route(method, path, handler)
        else:
            getattr(router, method.lower())(path)(handler)


def register_routes(get_manager) -> bool:
    """Inside ComfyUI: mount on PromptServer's routes (ComfyUI mirrors them under /api/…)."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    add_routes(instance.routes, get_manager)
    return True
