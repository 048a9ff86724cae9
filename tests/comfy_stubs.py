"""Small stand-ins for the few ComfyUI modules the nodes touch (ComfyUI is not installable in CI).

They implement the documented behaviour we rely on: `ProgressBar.update` goes through a progress hook that raises
`InterruptProcessingException` once the global interrupt flag is set (and clears it); `folder_paths` lists files in
named folders; `PromptServer.instance.send_sync` records events.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path


class InterruptProcessingException(Exception):
    pass


class ComfyStubs:
    def __init__(self, root: Path):
        self.root = root
        self.models_dir = root / "models"
        self.output_dir = root / "output"
        self.input_dir = root / "input"
        self.interrupt = False
        self.progress: list[tuple[int, int]] = []
        self.events: list[tuple[str, dict]] = []
        self.folders = {name: [self.models_dir / name] for name in ("checkpoints", "text_encoders", "loras")}
        for paths in self.folders.values():
            paths[0].mkdir(parents=True, exist_ok=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.input_dir.mkdir(parents=True, exist_ok=True)

    def modules(self) -> dict[str, types.ModuleType]:
        stubs = self

        folder_paths = types.ModuleType("folder_paths")
        folder_paths.models_dir = str(self.models_dir)
        folder_paths.folder_names_and_paths = {k: ([str(p) for p in v], set()) for k, v in self.folders.items()}
        folder_paths.get_output_directory = lambda: str(stubs.output_dir)
        folder_paths.get_input_directory = lambda: str(stubs.input_dir)

        def get_filename_list(kind):
            files = []
            for base in stubs.folders.get(kind, []):
                files += sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
            return files

        def get_full_path_or_raise(kind, name):
            for base in stubs.folders.get(kind, []):
                if (base / name).is_file():
                    return str(base / name)
            raise FileNotFoundError(f"{name} not in {kind}")

        folder_paths.get_filename_list = get_filename_list
        folder_paths.get_folder_paths = lambda kind: [str(p) for p in stubs.folders.get(kind, [])]
        folder_paths.get_full_path_or_raise = get_full_path_or_raise

        mm = types.ModuleType("comfy.model_management")
        mm.InterruptProcessingException = InterruptProcessingException

        def throw_exception_if_processing_interrupted():
            if stubs.interrupt:
                stubs.interrupt = False
                raise InterruptProcessingException()

        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        mm.free_memory = lambda *a, **k: None

        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.current = total, 0

            def update(self, n):
                self.update_absolute(self.current + n)

            def update_absolute(self, value, total=None, preview=None):
                throw_exception_if_processing_interrupted()  # ComfyUI's progress hook does this first
                self.total = self.total if total is None else total
                self.current = min(value, self.total)
                stubs.progress.append((self.current, self.total))

        utils.ProgressBar = ProgressBar
        comfy = types.ModuleType("comfy")
        comfy.utils, comfy.model_management = utils, mm

        server = types.ModuleType("server")

        class PromptServer:
            instance = None

            def send_sync(self, event, data, sid=None):
                stubs.events.append((event, data))

        PromptServer.instance = PromptServer()
        server.PromptServer = PromptServer
        return {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils,
                "comfy.model_management": mm, "server": server}


def install(monkeypatch, root: Path) -> ComfyStubs:
    stubs = ComfyStubs(root)
    for name, module in stubs.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return stubs
