"""The ARC model loaded beside a base model (`sa3.sibling`): what it shares, that it equals the whole model, and the
DiT blocks lent from host memory (`sa3.host_streaming`)."""

import shutil

import pytest
import torch
from sa3_lora_studio import load_model
from sa3_lora_studio.sa3.host_streaming import stream_from_host
from sa3_lora_studio.sa3.loading import SafetensorsFile
from sa3_lora_studio.sa3.sibling import load_sibling, same_text_encoder
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def arc_whole(fixtures_dir):
    return load_model(fixtures_dir / "tiny-small-arc")


def _generate(model, lora, **kw):
    audio, _ = model.generate("a warm drone", duration=0.01, seed=5, steps=3, loras=[{"path": str(lora)}], **kw)
    return audio


def _copy_arc(fixtures_dir, tmp_path, change=None):
    """A copy of the ARC fixture folder; change(key, tensor) -> tensor edits its weights."""
    folder = tmp_path / "arc"
    shutil.copytree(fixtures_dir / "tiny-small-arc", folder)
    if change is not None:
        file = SafetensorsFile(folder / "model.safetensors")
        tensors = {k: change(k, t) for k, t in file.read_many(file.keys(), lambda k: None)}
        save_file(tensors, folder / "model.safetensors")
    return folder


def test_the_sibling_shares_autoencoder_and_text_encoder_and_equals_the_whole_model(tiny, arc_whole, fixtures_dir):
    arc = load_sibling(tiny, fixtures_dir / "tiny-small-arc")
    assert arc.is_arc and arc.shared_parts == ("autoencoder", "text encoder")
    assert arc.autoencoder is tiny.autoencoder
    assert arc.conditioner.conditioners["prompt"].text_encoder is tiny.conditioner.conditioners["prompt"].text_encoder
    whole = arc_whole.modules.state_dict()
    own = arc.modules.state_dict()
    assert set(own) == set(whole) and all(torch.equal(own[k], whole[k]) for k in whole)
    lora = fixtures_dir / "golden" / "lora" / "bora.safetensors"
    assert torch.equal(_generate(arc, lora), _generate(arc_whole, lora))
    # the base model is untouched by its sibling
    assert not torch.equal(tiny.dit.transformer.layers[0].self_attn.to_out.weight,
                           arc.dit.transformer.layers[0].self_attn.to_out.weight)


def test_the_autoencoder_check_is_remembered_until_the_checkpoint_changes(tiny, fixtures_dir, tmp_path, monkeypatch):
    import sa3_lora_studio.sa3.sibling as sibling

    calls = []
    real = sibling._equal_autoencoder_tensors
    monkeypatch.setattr(sibling, "_equal_autoencoder_tensors", lambda *a: calls.append(1) or real(*a))
    folder = _copy_arc(fixtures_dir, tmp_path)
    for _ in range(2):
        assert "autoencoder" in load_sibling(tiny, folder).shared_parts
    assert len(calls) == 1
    _copy_arc(fixtures_dir, tmp_path / "x", lambda k, t: t * 2 if k.startswith("pretransform.") else t)
    shutil.copy(tmp_path / "x" / "arc" / "model.safetensors", folder / "model.safetensors")  # replaced in place
    assert "autoencoder" not in load_sibling(tiny, folder).shared_parts and len(calls) == 2


def test_an_autoencoder_that_differs_is_loaded_for_the_sibling_alone(tiny, fixtures_dir, tmp_path):
    folder = _copy_arc(fixtures_dir, tmp_path, lambda k, t: t + 1e-3 if k.startswith("pretransform.") else t)
    arc = load_sibling(tiny, folder)
    assert arc.shared_parts == ("text encoder",) and arc.autoencoder is not tiny.autoencoder
    whole = load_model(folder, text_encoder=fixtures_dir / "tiny-small" / "t5gemma-b-b-ul2")
    lora = fixtures_dir / "golden" / "lora" / "lora.safetensors"
    assert torch.equal(_generate(arc, lora), _generate(whole, lora))


def test_a_text_encoder_is_shared_when_its_files_are_equal_and_loaded_anew_when_not(tiny, fixtures_dir, tmp_path):
    source = fixtures_dir / "tiny-small" / "t5gemma-b-b-ul2"
    copy = tmp_path / "te-copy"
    shutil.copytree(source, copy)
    assert same_text_encoder(copy, source)
    arc = load_sibling(tiny, _copy_arc(fixtures_dir, tmp_path))
    assert "text encoder" in arc.shared_parts

    changed = tmp_path / "te-changed"
    shutil.copytree(source, changed)
    file = SafetensorsFile(changed / "model.safetensors")
    tensors = {k: t for k, t in file.read_many(file.keys(), lambda k: None)}
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, changed / "model.safetensors")
    assert not same_text_encoder(changed, source)

    folder = _copy_arc(fixtures_dir, tmp_path / "b")
    shutil.copytree(changed, folder / "t5gemma-b-b-ul2")  # the ARC folder's own, different, encoder
    arc = load_sibling(tiny, folder)
    assert arc.shared_parts == ("autoencoder",)
    mine = arc.conditioner.conditioners["prompt"]
    assert mine.text_encoder is not tiny.conditioner.conditioners["prompt"].text_encoder
    assert mine.text_encoder_source == folder / "t5gemma-b-b-ul2"


def test_dit_blocks_streamed_from_host_are_lent_per_forward_and_give_the_same_audio(tiny, arc_whole, fixtures_dir):
    arc = load_sibling(tiny, fixtures_dir / "tiny-small-arc", stream_dit=True)
    assert arc.streams_dit
    block = arc.dit.transformer.layers[0]
    weight = block.self_attn.to_out.weight
    host = weight.data
    seen = []
    handle = block.self_attn.register_forward_hook(lambda m, a, o: seen.append(weight.data.data_ptr()))
    lora = fixtures_dir / "golden" / "lora" / "dora-rows.safetensors"
    try:
        audio = _generate(arc, lora)  # a streaming model uses the adapters' low-memory path whatever is asked
    finally:
        handle.remove()
    assert seen and host.data_ptr() not in seen  # the forward ran on a lent copy...
    assert weight.data.data_ptr() == host.data_ptr()  # ...and the block holds its host tensor again
    expected = _generate(arc_whole, lora, adapter_memory="low")
    assert torch.equal(audio, expected)


def test_a_block_that_raises_still_gives_its_lent_tensors_back():
    block = torch.nn.Linear(4, 4)
    host = block.weight.data
    stream_from_host([block], "cpu")
    with pytest.raises(RuntimeError):
        block(torch.ones(3, 5))  # wrong width
    assert block.weight.data.data_ptr() == host.data_ptr()
    with pytest.raises(ValueError, match="host memory"):
        stream_from_host([torch.nn.Linear(2, 2, device="meta")], "cpu")


def test_low_memory_adapters_form_no_copy_of_a_linear_weight(tiny, fixtures_dir, monkeypatch):
    import sa3_lora_studio.adapters.apply as apply

    formed = []
    real = apply.effective_weight

    def recording(w, *args, **kwargs):
        formed.append(w.dim())
        return real(w, *args, **kwargs)

    monkeypatch.setattr(apply, "effective_weight", recording)
    lora = fixtures_dir / "golden" / "lora" / "dora-cols.safetensors"
    fast = _generate(tiny, lora)
    assert 2 in formed  # merged: every adapted Linear's weight is formed once
    formed.clear()
    low = _generate(tiny, lora, adapter_memory="low")
    assert 2 not in formed  # only the two Conv1d layers (3-D weights) are formed, per evaluation
    assert torch.allclose(low, fast, atol=1e-4)
    with pytest.raises(ValueError, match="adapter_memory"):
        _generate(tiny, lora, adapter_memory="tiny")


def test_a_sibling_of_the_same_checkpoint_is_the_model_itself(tiny, fixtures_dir):
    assert load_sibling(tiny, fixtures_dir / "tiny-small", "arc") is tiny


def test_a_streamed_model_keeps_adapters_where_it_computes_and_no_weight_sized_cache(tiny, arc_whole, fixtures_dir):
    from sa3_lora_studio.adapters import adapter_session

    arc = load_sibling(tiny, fixtures_dir / "tiny-small-arc", stream_dit=True)
    loras = [{"path": str(fixtures_dir / "golden" / "lora" / f"{kind}.safetensors"), "strength": 0.7}
             for kind in ("bora", "dora-cols-xs")]  # a stack: the first adapter is the second one's prefix
    cond = arc.encode_text(["a bell"], [0.01])
    x = torch.randn(1, arc.latent_dim, 2, generator=torch.Generator().manual_seed(0))
    outputs = []
    for model, mode in ((arc, "factored"), (arc_whole, "factored"), (arc_whole, "merged")):
        session = adapter_session(model, loras, mode=mode)
        with torch.inference_mode(), session:
            outputs.append(model.velocity(x, 0.5, cond))
        if model is arc:
            assert all(layer._merged is None for layer in session.layers.values())  # nothing W-sized kept
            assert all(layer.streamed for layer in session.layers.values())
    assert torch.equal(outputs[0], outputs[1]) and torch.allclose(outputs[0], outputs[2], atol=1e-5)

    # the adapter tensors go to the device the model computes on, not to where a streamed block rests between uses
    class Elsewhere:
        modules, device, streams_dit = arc.modules, torch.device("meta"), True

    session = adapter_session(Elsewhere(), loras[:1], mode="factored")
    assert {t.device.type for layer in session.layers.values() for slot in layer.slots
            for t in slot.tensors().values()} == {"meta"}
    assert adapter_session(Elsewhere(), loras[:1], mode="merged").mode == "factored"  # the one mode it can use
    from sa3_lora_studio.adapters import SA3_ROOTS, AdaptedModel, AdapterUse, read_adapter_file

    with pytest.raises(ValueError, match="factored"):
        AdaptedModel(arc.modules, [AdapterUse(read_adapter_file(loras[0]["path"]))], SA3_ROOTS, mode="merged",
                     streamed=True)
    with pytest.raises(ValueError, match="factored"):
        session.set_mode("merged")


def test_a_streamed_stack_follows_its_first_adapters_interval(tiny, arc_whole, fixtures_dir):
    arc = load_sibling(tiny, fixtures_dir / "tiny-small-arc", stream_dit=True)
    loras = [{"path": str(fixtures_dir / "golden" / "lora" / "bora.safetensors"), "interval": (0.0, 0.95)},
             {"path": str(fixtures_dir / "golden" / "lora" / "dora-rows.safetensors")}]  # renorms its prefix's rows

    def run(model, stack):
        audio, _ = model.generate("a bell", duration=0.01, seed=3, steps=4, loras=stack, adapter_memory="low")
        return audio

    streamed = run(arc, loras)
    assert torch.equal(streamed, run(arc_whole, loras))
    merged, _ = arc_whole.generate("a bell", duration=0.01, seed=3, steps=4, loras=loras, adapter_memory="fast")
    assert torch.allclose(streamed, merged, atol=1e-4)  # the reference semantics (formed weights)
    assert not torch.allclose(streamed, run(arc_whole, loras[1:]), atol=1e-4)  # the interval's adapter counts
