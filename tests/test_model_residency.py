"""Freeing SA3 models for ComfyUI: idle GPU models go to host memory and come back on their next use (the same
object, as a cached SA3 Load Pack output is reused), models in use are kept, and ComfyUI's own unload/free-memory
calls reach ours (sa3/residency.py, nodes/model_nodes.py, nodes/comfy_bridge.install_memory_hooks)."""

import os
import socket
import threading
import types
import warnings

import comfy_stubs
import pytest
import torch
from sa3_lora_studio import load_model
from sa3_lora_studio.nodes import model_nodes, training_nodes
from sa3_lora_studio.nodes.comfy_bridge import install_memory_hooks
from simulated_device import simulate
from test_nodes import _train_inputs, run_node


@pytest.fixture
def cache():
    model_nodes.unload_idle()
    yield model_nodes
    model_nodes.unload_idle()


def _devices(model, text_encoder=True) -> set[str]:
    """Where the weights are; the text encoder goes back to the device only for a prompt it has not encoded."""
    tensors = list(model.modules.parameters()) + list(model.modules.buffers())
    encoder = model.conditioner.conditioners["prompt"].text_encoder
    if encoder is not None and text_encoder:
        tensors += list(encoder.parameters())
    return {t.device.type for t in tensors}


def _generate(model, seed=3):
    """SA3 Generate's output waveform, as ComfyUI runs the node (inference mode)."""
    from sa3_lora_studio.nodes.generate_nodes import SA3Generate

    seconds = model.config.sample_size / model.sample_rate
    with torch.inference_mode():
        (audio,) = SA3Generate().generate(model, "a bell", "", seconds, seed, 2, 3.0, "auto", 1)["result"]
    return audio["waveform"]


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_an_idle_gpu_model_is_offloaded_and_its_next_use_brings_it_back(fixtures_dir, cache, device):
    model = load_model(fixtures_dir / "tiny-small")
    key = ("sa3-small-music", "base", "fp32", f"{device}:0")
    with warnings.catch_warnings(), simulate(device) as findings:
        warnings.simplefilter("ignore")
        model.modules.to(device)
        model.device = torch.device(device, 0)
        assert cache.get_or_load(key, lambda: model) is model
        before = _generate(model)
        report = cache.unload_idle()
        assert (report.unloaded, report.offloaded, report.kept) == (1, 1, [])
        assert "1 moved off the GPU" in report.summary()
        assert _devices(model) == {"cpu"} and model.residency.offloaded and cache.loaded_models() == []
        after = _generate(model)  # ComfyUI reuses its cached SA3 Load Pack output: the same object
        assert _devices(model, text_encoder=False) == {device} and not model.residency.offloaded
        assert cache.find_loaded(key) is model  # cached again: a run started now shares it, no second copy
        assert cache.unload_idle().offloaded == 1  # (inside the simulation: its tensors are simulated ones)
    assert not findings, dict(findings)
    assert torch.equal(before, after)


def test_models_in_use_stay_loaded_and_are_named(fixtures_dir, cache):
    model = load_model(fixtures_dir / "tiny-small")
    key = ("sa3-small-music", "base", "fp32", "cuda:0")
    with warnings.catch_warnings(), simulate("cuda"):
        warnings.simplefilter("ignore")
        model.modules.to("cuda")
        model.device = torch.device("cuda", 0)
        cache.get_or_load(key, lambda: model)
        with model.residency.in_use():
            report = cache.unload_idle()
            assert (report.unloaded, report.offloaded) == (0, 0) and len(report.kept) == 1
            assert "kept 1 in use" in report.summary() and "base on cuda:0" in report.summary()
            assert cache.offload_idle("cuda:0") == 0
            assert _devices(model, text_encoder=False) == {"cuda"} and cache.find_loaded(key) is model
        assert model.residency.users == 0
        assert cache.offload_idle("cuda:1") == 0  # another card's memory is not this model's
        assert cache.offload_idle("cuda") == 1 and _devices(model) == {"cpu"}
        assert cache.find_loaded(key) is model  # offloaded for memory pressure, still cached
        cache.unload_idle()
    with pytest.raises(RuntimeError, match="released more often"):
        model.residency.release()


def test_a_cpu_model_leaves_the_cache_but_stays_usable_and_is_shared_again(fixtures_dir, cache):
    model = load_model(fixtures_dir / "tiny-small")
    key = ("sa3-small-music", "base", "fp32", "cpu")
    cache.get_or_load(key, lambda: model)
    report = cache.unload_idle()
    assert (report.unloaded, report.offloaded) == (1, 0) and cache.loaded_models() == []
    assert not model.residency.can_offload and _devices(model) == {"cpu"}
    with cache.using(model):
        assert cache.find_loaded(key) is model
    assert cache.get_or_load(key, lambda: pytest.fail("loaded a second copy")) is model


def _comfy_model_management(free_bytes):
    """The calls ComfyUI's model management makes, shaped as upstream's: unload_all_models() frees through the
    module's own free_memory (so the wrapper sees that call too)."""
    mm = types.ModuleType("comfy.model_management")
    mm.calls = []

    def free_memory(memory_required, device, keep_loaded=()):
        mm.calls.append(("free_memory", memory_required, str(device)))
        return []

    def unload_all_models():
        mm.calls.append(("unload_all_models",))
        mm.free_memory(1e30, torch.device("cuda", 0))

    mm.free_memory, mm.unload_all_models = free_memory, unload_all_models
    mm.get_free_memory = lambda dev=None, torch_free_too=False: free_bytes[0]
    return mm


def test_comfyui_unload_and_free_memory_reach_sa3_models_once_wrapped(caplog):
    free_bytes = [8 << 30]
    mm = _comfy_model_management(free_bytes)
    seen = []
    unload = lambda: seen.append("unload_idle")  # noqa: E731
    offload = lambda device: seen.append(("offload_idle", str(device)))  # noqa: E731
    assert install_memory_hooks(unload, offload, mm) and install_memory_hooks(unload, offload, mm)  # wrapped once
    assert mm.free_memory.__name__ == "free_memory" and mm.unload_all_models.__name__ == "unload_all_models"
    assert mm.free_memory(1 << 30, torch.device("cuda", 0), keep_loaded=[]) == []  # enough free: ours stay
    mm.free_memory(1 << 30, torch.device("cpu"))  # host memory: nothing of ours to move
    assert seen == []
    free_bytes[0] = 512 << 20
    mm.free_memory(1 << 30, torch.device("cuda", 0))
    assert seen == [("offload_idle", "cuda:0")]
    seen.clear()
    mm.unload_all_models()  # "Unload models": everything idle goes, through both hooks
    assert seen == [("offload_idle", "cuda:0"), "unload_idle"]
    assert mm.calls[-2:] == [("unload_all_models",), ("free_memory", 1e30, "cuda:0")]

    def broken():
        raise OSError("disk gone")

    mm2 = _comfy_model_management(free_bytes)
    install_memory_hooks(broken, offload, mm2)
    mm2.unload_all_models()  # our failure is printed, never raised into ComfyUI's prompt worker
    assert "freeing SA3 models for ComfyUI failed" in caplog.text  # ComfyUI's log, as its own lines


def test_the_hooks_are_installed_when_the_pack_loads_inside_comfyui(monkeypatch, tmp_path):
    import sys

    import sa3_lora_studio.nodes.routes as routes
    from sa3_lora_studio import nodes

    comfy_stubs.install(monkeypatch, tmp_path / "comfy")  # PromptServer.instance exists: "inside ComfyUI"
    mm = sys.modules["comfy.model_management"]
    mm.unload_all_models = lambda: None
    monkeypatch.setattr(routes, "register_routes", lambda get_manager: None)
    training_nodes.reset_manager()
    nodes._register_routes()
    assert mm._sa3_memory_hooks and mm.unload_all_models.__wrapped__ is not None
    training_nodes.reset_manager()


def test_runs_a_restart_cut_off_are_marked_and_auto_resumed_as_the_pack_loads_without_any_request(
        monkeypatch, tmp_path, dataset, fixtures_dir, caplog):
    """SA3_AUTO_RESUME=1 on a headless server: the run goes on as ComfyUI starts, not at the first page or call."""
    import sa3_lora_studio.nodes.routes as routes
    from sa3_lora_studio import nodes
    from sa3_lora_studio.training.runs import RunConfig, RunRegistry

    stubs = comfy_stubs.install(monkeypatch, tmp_path / "comfy")
    monkeypatch.setattr(routes, "register_routes", lambda get_manager: None)
    registry = RunRegistry(stubs.output_dir / "sa3_runs")
    config = RunConfig(dataset=str(dataset), model=str(fixtures_dir / "tiny-small"), adapter_type="lora", rank=2,
                       steps=2, batch_size=1, crop_seconds=0.017, checkpoint_every=1000, demo_every=0, seed=1)
    cut_off = registry.create(config)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": -1}  # a pid reused since: not its trainer
    registry.update(cut_off, status="training")
    registry.update(cut_off, owner=owner)  # its process died with the old server
    monkeypatch.setenv("SA3_AUTO_RESUME", "1")
    training_nodes.reset_manager()
    try:
        nodes._register_routes()
        manager = training_nodes._MANAGER  # made by the loading itself: nothing asked for it
        assert manager is not None and manager.wait(cut_off, 300)["status"] == "done"
    finally:
        training_nodes.reset_manager()
    monkeypatch.setenv("SA3_RUNS_PER_DEVICE", "zero")  # a bad setting: said, the pack still loads
    caplog.clear()
    nodes._register_routes()
    assert "training runs not started: SA3_RUNS_PER_DEVICE='zero'" in caplog.text
    training_nodes.reset_manager()


def test_a_training_run_keeps_its_model_until_it_ends(comfy_env, dataset):
    from sa3_lora_studio.nodes.training_nodes import get_manager

    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    manager = get_manager()
    stepping, go_on = threading.Event(), threading.Event()

    def on_event(event):
        if event["type"] == "step":
            stepping.set()
            go_on.wait(60)

    manager.listeners.append(on_event)
    run, _ = run_node("SA3TrainLoRA", **_train_inputs(model=model, dataset=str(dataset), steps=3,
                                                      wait_until_done=False))
    assert stepping.wait(120)
    report = model_nodes.unload_idle()
    assert report.unloaded == 0 and len(report.kept) == 1 and model.residency.users == 1
    go_on.set()
    assert manager.wait(run, 120)["status"] == "done"
    assert model.residency.users == 0
    assert model_nodes.unload_idle().unloaded >= 1


@pytest.fixture
def comfy_env(monkeypatch, tmp_path, fixtures_dir):
    import shutil

    from sa3_lora_studio.nodes import training_nodes

    stubs = comfy_stubs.install(monkeypatch, tmp_path / "comfy")
    shutil.copytree(fixtures_dir / "tiny-small", stubs.models_dir / "sa3" / "sa3-small-music" / "base")
    model_nodes.unload_idle()
    training_nodes.reset_manager()
    yield stubs
    model_nodes.unload_idle()
    training_nodes.reset_manager()


def test_a_generation_out_of_device_memory_frees_comfyui_models_and_other_idle_sa3_models_then_retries(
        fixtures_dir, cache, monkeypatch, tmp_path):
    import sys

    comfy_stubs.install(monkeypatch, tmp_path / "comfy")
    mm = _comfy_model_management([0])  # ComfyUI freed what it could; the device is still full
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setattr(sys.modules["comfy"], "model_management", mm)
    install_memory_hooks(cache.unload_idle, cache.offload_idle, mm)
    model, other = load_model(fixtures_dir / "tiny-small"), load_model(fixtures_dir / "tiny-small")
    real_generate, failures = model.generate, [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")]

    def generate(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real_generate(*args, **kwargs)

    model.generate = generate
    with warnings.catch_warnings(), simulate("cuda") as findings:
        warnings.simplefilter("ignore")
        for m, variant in ((model, "base"), (other, "arc")):
            m.modules.to("cuda")
            m.device = torch.device("cuda", 0)
            cache.get_or_load(("sa3-small-music", variant, "fp32", "cuda:0"), lambda m=m: m)
        wave = _generate(model)
        assert ("free_memory", 1 << 62, "cuda:0") in mm.calls  # ComfyUI was asked for the whole device
        assert _devices(other, text_encoder=False) == {"cpu"}  # an idle SA3 model made room
        assert _devices(model, text_encoder=False) == {"cuda"}  # the generating one stayed where it works
        failures[:] = [RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)")] * 2
        with pytest.raises(RuntimeError, match=r"SA3 generation: out of memory on cuda:0 .*batch 1.*MPS "
                                               r"backend out of memory"):
            _generate(model)
        failures[:] = [ValueError("not a memory problem")]
        calls = len(mm.calls)
        with pytest.raises(ValueError, match="not a memory problem"):
            _generate(model)
        assert len(mm.calls) == calls  # no retry for other errors
        cache.unload_idle()
    assert not findings, dict(findings)
    assert wave.shape[0] == 1 and torch.isfinite(wave).all() and model.residency.users == 0


def test_training_on_a_gpu_asks_comfyui_for_the_room_it_estimates(comfy_env, dataset, monkeypatch):
    from sa3_lora_studio.nodes import training_nodes
    from sa3_lora_studio.training.runs import RunConfig
    from sa3_lora_studio.training.vram import estimate_training_memory

    model = load_model(comfy_env.models_dir / "sa3" / "sa3-small-music" / "base")
    asked = []
    monkeypatch.setattr(training_nodes, "free_comfy_memory", lambda n, device: asked.append((n, str(device),
                                                                                            model.residency.users)))
    config = RunConfig(dataset=str(dataset), model="sa3-small-music", steps=1)
    training_nodes.make_room(model, config)
    assert asked == []  # a CPU model: host memory is not ComfyUI's to free
    model.device = torch.device("cuda", 0)
    training_nodes.make_room(model, config)
    estimate = estimate_training_memory(model.config, config, model.text_encoder_parameters)
    assert asked == [(estimate["total"] - estimate["weights"] - estimate["text_encoder"], "cuda:0", 0)]


def test_a_comfyui_without_the_functions_is_told_once_not_broken(caplog):
    mm = types.ModuleType("comfy.model_management")
    assert install_memory_hooks(lambda: None, lambda device: None, mm) is False
    assert "will not free SA3 models" in caplog.text and not hasattr(mm, "_sa3_memory_hooks")


def test_the_unload_node_says_what_it_did_in_the_ui(comfy_env):
    from sa3_lora_studio.nodes import NODE_CLASS_MAPPINGS

    (model,) = run_node("SA3LoadPack", pack="sa3-small-music", variant="base", dtype="fp32", device="cpu")
    with model.residency.in_use():
        out = NODE_CLASS_MAPPINGS["SA3UnloadModels"]().unload()
        assert out["ui"]["text"] == list(out["result"]) and "kept 1 in use" in out["result"][0]
    (text,) = run_node("SA3UnloadModels")
    assert text == "unloaded 1 SA3 model(s)"


def test_a_sibling_sharing_parts_or_a_streaming_model_is_never_offloaded(fixtures_dir):
    """A sibling (sa3.sibling) shares the base model's autoencoder: moving its modules would move the base's."""
    model = load_model(fixtures_dir / "tiny-small")
    model.device = torch.device("cuda", 0)  # as seen by the rule (nothing is moved: offload refuses first)
    model.shared_parts = ("autoencoder",)
    assert not model.residency.can_offload and not model.residency.offload()
    model.shared_parts, model.streams_dit = (), True
    assert not model.residency.can_offload and not model.residency.offload()
    model.streams_dit = False
    assert model.residency.can_offload


def test_bringing_a_model_back_retries_once_after_asking_comfyui_for_memory(fixtures_dir, cache, monkeypatch):
    model = load_model(fixtures_dir / "tiny-small")
    model.residency.offloaded = True  # as after an unload; its device here is the CPU
    asked, moves, real_to = [], [], model.modules.to

    def to(*args, **kwargs):
        moves.append(args)
        if len(moves) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_to(*args, **kwargs)

    monkeypatch.setattr(model.modules, "to", to, raising=False)
    monkeypatch.setattr(cache, "free_comfy_memory", lambda n, device: asked.append(str(device)))
    with cache.using(model):
        assert model.residency.users == 1 and not model.residency.offloaded
    assert asked == ["cpu"] and len(moves) == 2 and model.residency.users == 0
    model.residency.offloaded, moves[:] = True, []
    monkeypatch.setattr(model.modules, "to", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory")), raising=False)
    with pytest.raises(RuntimeError, match="SA3: out of memory moving .* back to its device"):
        with cache.using(model):
            pass
    assert model.residency.users == 0


def test_a_generation_with_loras_that_never_fits_merged_falls_back_to_low_memory(fixtures_dir, cache, monkeypatch,
                                                                                   tmp_path, caplog):
    from sa3_lora_studio.nodes.generate_nodes import SA3Generate

    monkeypatch.setattr(cache, "free_comfy_memory", lambda n, device: None)
    model = load_model(fixtures_dir / "tiny-small")
    real_generate, memories = model.generate, []

    def generate(*args, **kwargs):
        memories.append(kwargs["adapter_memory"])
        if kwargs["adapter_memory"] == "fast":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(*args, **kwargs)

    model.generate = generate
    loras = [{"path": str(fixtures_dir / "golden" / "lora" / "dora-rows.safetensors"), "strength": 1.0}]
    seconds = model.config.sample_size / model.sample_rate
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (audio,) = SA3Generate().generate(model, "a bell", "", seconds, 1, 2, 3.0, "auto", 1, loras=loras)["result"]
        assert memories == ["fast", "fast", "low"] and torch.isfinite(audio["waveform"]).all()
        assert "generating with 'low'" in caplog.text
        memories.clear()
        with pytest.raises(RuntimeError, match="SA3 generation: out of memory"):  # no LoRA: nothing to fall back on
            SA3Generate().generate(model, "a bell", "", seconds, 1, 2, 3.0, "auto", 1)
        assert memories == ["fast", "fast"]


def test_a_dropped_model_is_freed_at_once_not_at_the_next_garbage_collection(fixtures_dir):
    """The residency refers to its model weakly: a model <-> residency cycle would keep a dropped model (and its
    device memory, e.g. a run's private ARC sibling after a round of demos) until Python's cyclic collector runs."""
    import copy
    import gc
    import weakref

    def dropped(copied: bool):
        model = load_model(fixtures_dir / "tiny-small")
        if copied:
            model = copy.deepcopy(model)
            assert model.residency._model is model
        with model.residency.in_use():
            pass
        return weakref.ref(model)

    dropped(False)  # torch's first-use initialisation keeps the first call's frames; measure the next ones
    gc.collect()
    gc.disable()
    try:
        assert dropped(False)() is None and dropped(True)() is None
    finally:
        gc.enable()
