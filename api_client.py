"""`sa3-lora queue`: run an API-format workflow on a ComfyUI server headlessly.

Posts the graph to `/prompt`, follows progress on `/ws` (ComfyUI's `progress`/`executing`/`execution_*` messages and
our `sa3.*` training events), then downloads every output file listed by `/history/{prompt_id}` through `/view`.
Exit code 0 on success; non-zero with the node error on failure.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any


class QueueError(RuntimeError):
    pass


def parse_value(text: str) -> Any:
    """`--set` values: JSON when it parses (numbers, booleans, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(graph: dict, overrides: list[str]) -> dict:
    """`--set NODE.INPUT=VALUE` where NODE is a node id or a node title (`_meta.title`)."""
    graph = json.loads(json.dumps(graph))
    for item in overrides:
        target, sep, value = item.partition("=")
        node_ref, dot, input_name = target.rpartition(".")
        if not sep or not dot or not node_ref or not input_name:
            raise QueueError(f"--set {item!r}: use NODE.INPUT=VALUE (NODE is a node id or title)")
        matches = [nid for nid, node in graph.items()
                   if nid == node_ref or node.get("_meta", {}).get("title") == node_ref]
        if not matches:
            raise QueueError(f"--set {item!r}: no node with id or title {node_ref!r}")
        for nid in matches:
            graph[nid].setdefault("inputs", {})[input_name] = parse_value(value)
    return graph


def load_api_workflow(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:  # not the server's fault: said here, before any connection is tried
        raise QueueError(f"workflow {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QueueError(f"workflow {path}: not JSON ({e})") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise QueueError(f"{path} is a UI-format workflow; queue its API-format twin (example_workflows/api/) or "
                         "export it with 'Export (API)' in ComfyUI")
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise QueueError(f"{path}: not an API-format workflow ({{id: {{class_type, inputs}}}})")
    return data


def _format_node_errors(payload: dict) -> str:
    parts = []
    err = payload.get("error")
    if isinstance(err, dict):
        parts.append(f"{err.get('type', 'error')}: {err.get('message', '')} {err.get('details', '')}".strip())
    elif err:
        parts.append(str(err))
    for node_id, info in (payload.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            where = f"node {node_id} ({info.get('class_type', '?')})"
            parts.append(f"{where}: {e.get('message', '')} {e.get('details', '')}".strip())
    return "; ".join(parts) or json.dumps(payload)[:500]


async def _finished_history(session, server: str, prompt_id: str, wait_seconds: float = 30.0) -> dict:
    """The prompt's `/history` entry. ComfyUI sends its end-of-prompt websocket messages before it stores the
    history, so the entry can be missing for a moment: poll until it is there (an empty dict if it never comes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    while True:
        async with session.get(f"{server}/history/{prompt_id}") as resp:
            entry = (await resp.json(content_type=None) or {}).get(prompt_id)
        if entry and (entry.get("status") or {}).get("completed", True):
            return entry
        if loop.time() >= deadline:
            return entry or {}
        await asyncio.sleep(0.2)


async def queue_workflow(server: str, graph: dict, out_dir: str | Path, timeout: float = 3600.0,
                         log=print) -> list[Path]:
    import aiohttp

    server = server.rstrip("/")
    client_id = uuid.uuid4().hex
    out = Path(out_dir)
    async with aiohttp.ClientSession() as session:
        ws_url = server.replace("http://", "ws://").replace("https://", "wss://") + f"/ws?clientId={client_id}"
        async with session.ws_connect(ws_url) as ws:
            async with session.post(f"{server}/prompt", json={"prompt": graph, "client_id": client_id}) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200 or body.get("node_errors"):
                    raise QueueError(f"the server refused the workflow: {_format_node_errors(body)}")
            prompt_id = body["prompt_id"]
            log(f"queued {prompt_id}")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise QueueError(f"timed out after {timeout:.0f} s waiting for {prompt_id}")
                msg = await ws.receive(timeout=remaining)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    continue  # previews
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    raise QueueError("the server closed the websocket before the prompt finished")
                event = json.loads(msg.data)
                kind, data = event.get("type"), event.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "progress":
                    log(f"  node {data.get('node')}: {data.get('value')}/{data.get('max')}")
                elif kind == "executing" and data.get("node") is not None:
                    log(f"  executing node {data['node']}")
                elif kind == "execution_error":
                    raise QueueError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                                     f"{data.get('exception_type', '')}: {data.get('exception_message', '')}")
                elif kind == "execution_interrupted":
                    raise QueueError("the prompt was interrupted on the server")
                elif kind and kind.startswith("sa3."):
                    if kind == "sa3.step":
                        log(f"  training {data.get('run')}: step {data.get('step')} loss {data.get('loss'):.4f}")
                    elif kind in ("sa3.checkpoint", "sa3.demo", "sa3.status"):
                        details = {k: v for k, v in data.items() if k not in ("run", "time", "type")}
                        log(f"  training {data.get('run')}: {kind[4:]} {json.dumps(details)}")
                elif kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                                     and data.get("prompt_id") == prompt_id):
                    break
        history = await _finished_history(session, server, prompt_id)
        files = []
        for node_id, outputs in (history.get("outputs") or {}).items():
            for items in outputs.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if not isinstance(item, dict) or "filename" not in item:
                        continue
                    params = {"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                              "type": item.get("type", "output")}
                    async with session.get(f"{server}/view", params=params) as resp:
                        if resp.status != 200:
                            raise QueueError(f"could not download {item['filename']} (HTTP {resp.status})")
                        data = await resp.read()
                    name = Path(item["filename"]).name  # never trust a server-given path
                    target = out / node_id / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                    files.append(target)
                    log(f"saved {target}")
    return files


def add_queue_parser(sub) -> None:
    p = sub.add_parser("queue", help="run an API-format workflow on a ComfyUI server and download its outputs")
    p.add_argument("workflow", help="API-format workflow JSON")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address (default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input (NODE is a node id or title); repeatable")
    p.add_argument("--out", default="sa3-outputs", help="where downloaded outputs go")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the outputs (default %(default)g)")
    p.set_defaults(func=_cmd_queue)


def _cmd_queue(args) -> int:
    try:
        graph = apply_overrides(load_api_workflow(args.workflow), args.overrides)
        files = asyncio.run(queue_workflow(args.server, graph, args.out, args.timeout))
    except QueueError as e:
        print(f"sa3-lora queue: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sa3-lora queue: cannot reach {args.server}: {e}", file=sys.stderr)
        return 1
    print(f"done: {len(files)} file(s) in {args.out}")
    return 0
