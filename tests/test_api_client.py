"""`sa3-lora queue` against a local aiohttp server speaking ComfyUI's documented /prompt, /ws, /history, /view."""

import asyncio
import json
import threading

import pytest
from aiohttp import web
from sa3_lora_studio.api_client import QueueError, apply_overrides, load_api_workflow
from sa3_lora_studio.cli import main

GRAPH = {"1": {"class_type": "SA3LoadPack", "inputs": {"pack": "sa3-small-music"}, "_meta": {"title": "Load"}},
         "2": {"class_type": "SA3Generate", "inputs": {"model": ["1", 0], "seed": 0}, "_meta": {"title": "Gen"}}}


class FakeComfy:
    """The request/response shapes of ComfyUI's API, with a scripted execution."""

    def __init__(self, fail=False, history_late_by=0):
        self.fail, self.received, self.sockets = fail, [], []
        self.history_late_by = history_late_by  # like ComfyUI: /history is written after the end messages
        self.app = web.Application()
        self.app.router.add_post("/prompt", self.prompt)
        self.app.router.add_get("/ws", self.ws)
        self.app.router.add_get("/history/{pid}", self.history)
        self.app.router.add_get("/view", self.view)

    async def ws(self, request):
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        self.sockets.append(sock)
        async for _ in sock:
            pass
        return sock

    async def prompt(self, request):
        body = await request.json()
        if body["prompt"]["2"]["inputs"].get("seed") == -5:
            return web.json_response({"error": {"type": "prompt_outputs_failed_validation", "message": "bad"},
                                      "node_errors": {"2": {"class_type": "SA3Generate",
                                                            "errors": [{"message": "seed below 0", "details": "seed"}]}}},
                                     status=400)
        self.received.append(body)
        asyncio.get_running_loop().create_task(self.execute("p1"))
        return web.json_response({"prompt_id": "p1", "number": 0, "node_errors": {}})

    async def execute(self, pid):
        await asyncio.sleep(0.05)
        sock = self.sockets[-1]
        await sock.send_json({"type": "executing", "data": {"node": "2", "prompt_id": pid}})
        await sock.send_json({"type": "progress", "data": {"value": 1, "max": 2, "node": "2", "prompt_id": pid}})
        await sock.send_bytes(b"\x00\x00\x00\x01preview")
        await sock.send_json({"type": "sa3.step", "data": {"run": "r", "step": 3, "loss": 0.25}})
        if self.fail:
            await sock.send_json({"type": "execution_error", "data": {"prompt_id": pid, "node_id": "2",
                                  "node_type": "SA3Generate", "exception_type": "ValueError",
                                  "exception_message": "SA3 Generate: prompt too long"}})
            return
        await sock.send_json({"type": "executing", "data": {"node": None, "prompt_id": pid}})

    async def history(self, request):
        if self.history_late_by > 0:
            self.history_late_by -= 1
            return web.json_response({})
        return web.json_response({"p1": {"outputs": {"3": {"audio": [
            {"filename": "../../evil/out.flac", "subfolder": "", "type": "output"}]}}, "status": {}}})

    async def view(self, request):
        return web.Response(body=b"fLaC-bytes-" + request.query["filename"].encode())


@pytest.fixture
def server():
    def start(fail=False, history_late_by=0):
        fake = FakeComfy(fail, history_late_by)
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(fake.app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        started.append((loop, runner))
        return fake, f"http://127.0.0.1:{port}"

    started = []
    yield start
    for loop, runner in started:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)


def test_queue_posts_follows_progress_and_downloads_outputs(server, tmp_path, capsys):
    fake, url = server()
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(GRAPH))
    code = main(["queue", str(wf), "--server", url, "--set", "Gen.seed=42", "--set", "1.pack=sa3-medium",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    sent = fake.received[0]["prompt"]
    assert sent["2"]["inputs"]["seed"] == 42 and sent["1"]["inputs"]["pack"] == "sa3-medium"
    saved = tmp_path / "out" / "3" / "out.flac"  # the server-given '../../evil/' is not followed
    assert saved.read_bytes().startswith(b"fLaC-bytes-")
    out = capsys.readouterr().out
    assert "1/2" in out and "step 3" in out


def test_outputs_are_downloaded_when_the_history_is_written_after_the_end_message(server, tmp_path):
    # Seen with a real ComfyUI: the client read an empty /history right after `executing: None` and saved nothing.
    fake, url = server(history_late_by=3)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(GRAPH))
    assert main(["queue", str(wf), "--server", url, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "3" / "out.flac").exists()


def test_queue_exits_nonzero_with_the_node_error(server, tmp_path, capsys):
    fake, url = server(fail=True)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(GRAPH))
    assert main(["queue", str(wf), "--server", url, "--out", str(tmp_path / "o")]) == 1
    assert "SA3 Generate: prompt too long" in capsys.readouterr().err


def test_validation_errors_are_reported_per_node(server, tmp_path, capsys):
    fake, url = server()
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(GRAPH))
    assert main(["queue", str(wf), "--server", url, "--set", "2.seed=-5"]) == 1
    assert "node 2 (SA3Generate): seed below 0" in capsys.readouterr().err


def test_ui_format_workflows_and_bad_overrides_are_refused(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(QueueError, match="UI-format"):
        load_api_workflow(ui)
    with pytest.raises(QueueError, match="NODE.INPUT=VALUE"):
        apply_overrides(GRAPH, ["seed=1"])
    with pytest.raises(QueueError, match="no node"):
        apply_overrides(GRAPH, ["Nope.seed=1"])


def test_a_missing_or_unreadable_workflow_file_is_named_not_blamed_on_the_server(tmp_path, capsys):
    from sa3_lora_studio.cli import main

    assert main(["queue", str(tmp_path / "nofile.json"), "--server", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert f"workflow {tmp_path / 'nofile.json'}: No such file or directory" in err and "reach" not in err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["queue", str(tmp_path / "bad.json")]) == 1
    assert "bad.json: not JSON" in capsys.readouterr().err
