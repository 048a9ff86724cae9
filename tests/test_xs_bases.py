"""-xs bases from elsewhere than the weights an adapter is applied to: the official SVD bases file (`svd_bases_path`
in a model_config.json, written by `sa3-lora svd-bases`) and the base model beside an ARC model in the packs'
layout. A base-trained -xs adapter on the ARC model then uses the bases it was trained with."""

import json
import shutil
import warnings

import pytest
import torch
from sa3_lora_studio import load_model
from sa3_lora_studio.adapters.apply import SA3_ROOTS, AdaptedModel, adapter_session, new_adapter
from sa3_lora_studio.adapters.files import read_adapter_file
from sa3_lora_studio.adapters.xs_bases import (
    XsBasesError,
    XsBasesSource,
    bases_file_key,
    compute_svd_bases,
    read_svd_bases_file,
    write_svd_bases_file,
)
from sa3_lora_studio.cli import main
from safetensors.torch import load_file


def _trained_xs(model, adapter_type="lora-xs", rank=4, seed=0):
    """A fresh -xs adapter on model (recording its base fingerprint) with a non-zero core, as after training."""
    a = new_adapter(model.modules, adapter_type, rank, roots=SA3_ROOTS, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    for t in a.layers.values():
        t["M_xs"] = 0.05 * torch.randn(t["M_xs"].shape, generator=g)
    return a


def _pack(tmp_path, fixtures_dir, with_base=True):
    """<tmp>/tiny/arc (and base) in the packs' layout, copied from the fixtures."""
    root = tmp_path / "tiny"
    shutil.copytree(fixtures_dir / "tiny-small-arc", root / "arc")
    if with_base:
        shutil.copytree(fixtures_dir / "tiny-small", root / "base")
    return root


def _weight(model, layer):
    """A layer's base weight; layer as in adapter files (relative to the DiT wrapper or the conditioner)."""
    root = "model" if layer.startswith("model.") else "conditioner"
    return model.modules.get_submodule(f"{root}.{layer}").weight


class Payload:  # an arbitrary object in a pickle: never unpickled
    pass


def _bases_in_view(view, layer):
    slot = next(s for lay in view.layers.values() for s in lay.slots if s.layer == layer)
    return slot.tensors()["U"], slot.tensors()["V"]


def _expected_bases(checkpoint, layer, rank):
    return compute_svd_bases(load_file(str(checkpoint))[bases_file_key(layer)], rank)


def test_a_written_bases_file_reads_back_in_the_official_structure(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {"model.model.a.weight": torch.randn(12, 8, generator=g),
               "conditioner.conditioners.b.weight": torch.randn(6, 3, 2, generator=g)}  # a Conv1d weight
    path = write_svd_bases_file(tmp_path / "b.pt", iter(weights.items()), columns=5)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(weights)
    a, b = raw["model.model.a.weight"], raw["conditioner.conditioners.b.weight"]
    assert a["U"].shape == (12, 5) and a["V"].shape == (8, 5) and a["S"].shape == (5,) and a["shape"] == [12, 8]
    assert b["U"].shape == (6, 5) and b["V"].shape == (6, 5) and b["shape"] == [6, 3, 2]  # k = min(out, in·k) = 6
    for key, w in weights.items():
        u, v = compute_svd_bases(w, 5)
        assert torch.equal(raw[key]["U"], u) and torch.equal(raw[key]["V"], v)  # the same bases as on the fly
        w2 = w.reshape(w.shape[0], -1)
        assert torch.allclose(raw[key]["U"] * raw[key]["S"] @ raw[key]["V"].T,
                              torch.linalg.svd(w2).U[:, :5] @ torch.diag(torch.linalg.svdvals(w2)[:5])
                              @ torch.linalg.svd(w2).Vh[:5], atol=1e-5)  # a rank-5 truncation of W
    read = read_svd_bases_file(path)
    assert torch.equal(read["model.model.a.weight"][0], a["U"]) and not (tmp_path / "b.pt.partial").exists()


def test_bad_bases_files_are_named_errors(tmp_path):
    with pytest.raises(XsBasesError, match="missing.pt does not exist"):
        read_svd_bases_file(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a pickle")
    with pytest.raises(XsBasesError, match="text.pt could not be read"):
        read_svd_bases_file(tmp_path / "text.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(XsBasesError, match="list.pt holds a list"):
        read_svd_bases_file(tmp_path / "list.pt")
    torch.save({"model.x.weight": {"U": torch.zeros(3, 2)}}, tmp_path / "half.pt")
    with pytest.raises(XsBasesError, match="half.pt: model.x.weight needs 'U'"):
        read_svd_bases_file(tmp_path / "half.pt")
    torch.save({"other.x.weight": {"U": torch.zeros(3, 2), "V": torch.zeros(4, 2)}}, tmp_path / "none.pt")
    with pytest.raises(XsBasesError, match="none.pt has no 'model.\\*' or 'conditioner.\\*' entries"):
        read_svd_bases_file(tmp_path / "none.pt")
    torch.save({"model.x.weight": Payload()}, tmp_path / "object.pt")
    with pytest.raises(XsBasesError, match="object.pt holds Python objects besides tensors") as refused:
        read_svd_bases_file(tmp_path / "object.pt")
    assert "weights_only" not in str(refused.value)  # no advice to unpickle it anyway
    torch.save({"model.model.x.weight": {"U": torch.zeros(3, 2), "V": torch.zeros(4, 2)}}, tmp_path / "small.pt")
    source = XsBasesSource(file=tmp_path / "small.pt")
    assert source.bases("model.other", 2, (3, 4)) is None
    assert [t.shape for t in source.bases("model.x", 1, (3, 4))] == [(3, 1), (4, 1)]
    with pytest.raises(XsBasesError, match="small.pt: model.model.x.weight has bases for a \\[3, 4\\] weight, the "
                                           "model's is \\[5, 4\\]"):
        source.bases("model.x", 2, (5, 4))
    with pytest.raises(XsBasesError, match="holds 2 basis vectors; this adapter has rank 3"):
        source.bases("model.x", 3, (3, 4))


def test_an_xs_adapter_on_the_arc_model_beside_its_base_uses_the_base_bases(tmp_path, fixtures_dir, tiny):
    root = _pack(tmp_path, fixtures_dir)
    arc = load_model(root / "arc")
    adapter = _trained_xs(tiny, "dora-rows-xs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained on the base beside it: no warning
        with adapter_session(arc, [adapter]) as view:
            pass
    assert view.report.notes == [f"adapter 0: dora-rows-xs bases from the base model {root / 'base'}, the weights "
                                 f"it was trained on"]
    for layer in list(adapter.layers)[:3]:
        u, v = _bases_in_view(view, layer)
        eu, ev = _expected_bases(root / "base" / "model.safetensors", layer, 4)
        assert torch.equal(u, eu) and torch.equal(v, ev)
        own_u, _ = compute_svd_bases(_weight(arc, layer), 4)
        assert not torch.equal(u, own_u)  # the ARC weights' own bases would differ
    # the generated audio differs from that of the same adapter with the ARC weights' own bases
    plain = AdaptedModel(arc.modules, [adapter], SA3_ROOTS)  # no source: the old behaviour, with its warning
    assert any("trained on other base weights" in w for w in plain.report.warnings)
    full = next(iter(view.layers))
    assert not torch.equal(view.layers[full].weight, plain.layers[full].weight)


def test_an_adapter_trained_on_the_arc_model_keeps_its_own_bases_and_unknown_ones_warn(tmp_path, fixtures_dir, tiny):
    root = _pack(tmp_path, fixtures_dir)
    arc = load_model(root / "arc")
    own = _trained_xs(arc)
    with adapter_session(arc, [own]) as view:
        pass
    assert view.report.notes == [] and view.report.warnings == []
    layer = next(iter(own.layers))
    assert torch.equal(_bases_in_view(view, layer)[0], compute_svd_bases(_weight(arc, layer), 4)[0])
    stranger = _trained_xs(tiny)
    stranger.metadata["base_fingerprint"] = "0123456789abcdef"  # trained on weights neither model has
    with pytest.warns(UserWarning, match="trained on other base weights.*svd_bases_path"):
        adapter_session(arc, [stranger])


def test_an_official_xs_file_without_fingerprint_on_the_arc_model_takes_the_base_bases(tmp_path, fixtures_dir):
    root = _pack(tmp_path, fixtures_dir)
    arc = load_model(root / "arc")
    official = read_adapter_file(fixtures_dir / "golden" / "lora" / "lora-xs.safetensors")
    assert not official.metadata.get("base_fingerprint")
    with adapter_session(arc, [official]) as view:
        pass
    assert "without a base fingerprint; its SVD bases come from the base model" in view.report.notes[0]
    layer = next(iter(official.layers))
    expected = _expected_bases(root / "base" / "model.safetensors", layer, official.rank)
    assert torch.equal(_bases_in_view(view, layer)[0], expected[0])
    alone = load_model(_pack(tmp_path / "alone", fixtures_dir, with_base=False) / "arc")  # no base beside it
    with adapter_session(alone, [official]) as view:
        pass
    assert "recomputed from these weights" in view.report.warnings[0] and view.report.notes == []


def test_svd_bases_path_in_the_model_config_is_used_as_the_official_loader_does(tmp_path, fixtures_dir, tiny, capsys):
    arc_dir = tmp_path / "arc-with-bases"
    shutil.copytree(fixtures_dir / "tiny-small-arc", arc_dir)
    assert main(["svd-bases", str(fixtures_dir / "tiny-small"), "--out", str(arc_dir / "bases.pt"),
                 "--columns", "6"]) == 0
    out = capsys.readouterr().out
    assert "bases of 31 layers, up to rank 6" in out and "svd_bases_path" in out
    config = json.loads((arc_dir / "model_config.json").read_text())
    config["svd_bases_path"] = "bases.pt"  # relative to the config's folder
    (arc_dir / "model_config.json").write_text(json.dumps(config))
    arc = load_model(arc_dir)
    adapter = _trained_xs(tiny, "bora-xs")
    with adapter_session(arc, [adapter]) as view:
        pass
    assert view.report.notes == [f"adapter 0: bora-xs bases from the SVD bases file {arc_dir / 'bases.pt'} "
                                 f"(svd_bases_path in {arc_dir / 'model_config.json'})"]
    assert view.report.warnings == []
    for layer in adapter.layers:
        u, v = _bases_in_view(view, layer)
        eu, ev = compute_svd_bases(_weight(tiny, layer), 4)
        assert torch.equal(u, eu) and torch.equal(v, ev), layer
    partial = arc_dir / "partial.pt"  # a file written for some layers only: the rest use their own weights' bases
    assert main(["svd-bases", str(fixtures_dir / "tiny-small"), "--out", str(partial), "--include", "cross_attn"]) == 0
    config["svd_bases_path"] = "partial.pt"
    (arc_dir / "model_config.json").write_text(json.dumps(config))
    with adapter_session(load_model(arc_dir), [adapter]) as view:
        pass
    assert len(view.report.notes) == 2 and "of its layers (e.g. " in view.report.notes[1]
    assert "are not in the SVD bases file " in view.report.notes[1] and "partial.pt" in view.report.notes[1]
    config["svd_bases_path"] = "bases.pt"
    (arc_dir / "model_config.json").write_text(json.dumps(config))
    too_big = _trained_xs(tiny, "lora-xs", rank=8)
    with pytest.raises(XsBasesError, match="holds 6 basis vectors; this adapter has rank 8"):
        adapter_session(arc, [too_big])
    config["svd_bases_path"] = "gone.pt"
    (arc_dir / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(XsBasesError, match="gone.pt does not exist"):
        adapter_session(load_model(arc_dir), [adapter])
    lora = new_adapter(tiny.modules, "lora", 2, roots=SA3_ROOTS)  # a non -xs adapter never reads the file
    with adapter_session(load_model(arc_dir), [lora]) as view:
        pass
    assert view.report.notes == []


def test_svd_bases_command_refuses_bad_arguments(tmp_path, fixtures_dir, capsys):
    assert main(["svd-bases", str(fixtures_dir / "tiny-small"), "--out", str(tmp_path / "b.pt"), "--columns", "0"]) == 2
    assert "--columns must be at least 1" in capsys.readouterr().err
    assert main(["svd-bases", str(fixtures_dir / "tiny-small"), "--out", str(tmp_path / "no" / "b.pt")]) == 2
    assert "give a file path in an existing folder" in capsys.readouterr().err
    assert main(["svd-bases", str(fixtures_dir / "tiny-small"), "--out", str(tmp_path / "b.pt"),
                 "--include", "cross_attn"]) == 0
    keys = set(torch.load(tmp_path / "b.pt", weights_only=True))
    assert keys and all("cross_attn" in k for k in keys)


def test_an_xs_export_for_comfyui_on_the_arc_model_uses_the_bases_generation_uses(tmp_path, fixtures_dir, tiny):
    from sa3_lora_studio.adapters.apply import model_xs_bases
    from sa3_lora_studio.adapters.comfy_export import COMFY_PREFIX, comfy_tensors

    arc = load_model(_pack(tmp_path, fixtures_dir) / "arc")
    adapter = _trained_xs(tiny, "lora-xs")
    with adapter_session(arc, [adapter], mode="merged") as view:
        generated = {full: layer.weight.detach().float().clone() for full, layer in view.layers.items()
                     if full.startswith("model.")}
    tensors, report = comfy_tensors(adapter, arc.modules, xs_bases=model_xs_bases(arc))
    assert any("bases from the base model" in note for note in report.notes)
    assert "bases from the base model" in report.summary()
    checked = 0
    for full, want in generated.items():
        stem = COMFY_PREFIX + full.removeprefix("model.").removeprefix("model.")
        if stem + ".lora_up.weight" not in tensors:
            continue
        w = arc.modules.get_submodule(full).weight.detach().float()
        up, down, alpha = (tensors[stem + s] for s in (".lora_up.weight", ".lora_down.weight", ".alpha"))
        comfy = w + (alpha / down.shape[0]) * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
                                               ).reshape(w.shape)
        assert torch.allclose(comfy, want, atol=1e-5), full  # what ComfyUI renders = what we generate with
        checked += 1
    assert checked > 3


def test_sources_are_read_once_across_arc_models_loaded_anew_and_a_new_adapter_takes_no_svd(tmp_path, fixtures_dir,
                                                                                           tiny, monkeypatch):
    """Each ARC demo round loads the ARC model anew: the base's fingerprint and a bases file are not read again,
    and making a fresh -xs adapter computes no bases (the view that applies it takes them, maybe from a file)."""
    from sa3_lora_studio.adapters import xs_bases

    xs_bases.clear_cache()
    svds, reads, files = [], [], []
    real_svd, real_read, real_file = xs_bases.compute_svd_bases, XsBasesSource.base_weight, xs_bases.read_svd_bases_file
    monkeypatch.setattr(xs_bases, "compute_svd_bases", lambda w, r: svds.append(1) or real_svd(w, r))
    monkeypatch.setattr(XsBasesSource, "base_weight", lambda self, layer: reads.append(layer) or real_read(self, layer))
    monkeypatch.setattr(xs_bases, "read_svd_bases_file", lambda path: files.append(path) or real_file(path))
    adapter = _trained_xs(tiny, "lora-xs")
    assert svds == []  # new_adapter: no bases made only to be dropped
    root = _pack(tmp_path, fixtures_dir)
    for round_ in range(2):
        with adapter_session(load_model(root / "arc"), [adapter]) as view:
            pass
        assert "the weights it was trained on" in view.report.notes[0]
        if round_ == 0:
            first_reads, first_svds = len(reads), len(svds)
    layers = len(adapter.layers)
    assert first_reads == 2 * layers  # the fingerprint's, then the bases'
    assert len(reads) - first_reads == layers  # the fingerprint is known: only the bases' reads (and no new SVD)
    assert len(svds) == first_svds
    arc_dir = tmp_path / "arc-file"
    shutil.copytree(fixtures_dir / "tiny-small-arc", arc_dir)
    xs_bases.write_svd_bases_file(arc_dir / "b.pt", ((xs_bases.bases_file_key(layer), _weight(tiny, layer))
                                                    for layer in adapter.layers), columns=4)
    config = json.loads((arc_dir / "model_config.json").read_text())
    (arc_dir / "model_config.json").write_text(json.dumps({**config, "svd_bases_path": "b.pt"}))
    for _ in range(2):
        with adapter_session(load_model(arc_dir), [adapter]):
            pass
    assert len(files) == 1
