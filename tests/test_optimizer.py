"""The trainer's AdamW (training/optimizer.py): fused where torch can, the same maths and state as the looped form."""

import copy

import torch
from sa3_lora_studio.training.optimizer import adamw, load_adamw_state


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((16, 24), (40, 16), (40,))]


def _steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_cpu_adamw_is_fused_with_the_looped_maths_and_groups():
    fused_params, looped_params = _params(0), _params(0)
    groups = [{"params": fused_params[:2], "weight_decay": 0.01}, {"params": fused_params[2:], "weight_decay": 0.0}]
    fused = adamw(groups, lr=1e-2, betas=(0.9, 0.95))
    assert fused.defaults["fused"] is True
    looped = torch.optim.AdamW([{"params": looped_params[:2], "weight_decay": 0.01},
                                {"params": looped_params[2:], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    _steps(fused, fused_params, 1, 5)
    _steps(looped, looped_params, 1, 5)
    for a, b in zip(fused_params, looped_params):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(fused_params[0], _params(0)[0])  # it did train


def test_a_looped_training_state_resumes_in_the_fused_optimiser():
    """Training states saved before the switch (looped AdamW) load into the fused one and continue the same."""
    old_params, new_params = _params(2), _params(2)
    old = torch.optim.AdamW(old_params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    _steps(old, old_params, 3, 3)
    with torch.no_grad():
        for a, b in zip(new_params, old_params):
            a.copy_(b)
    new = adamw(new_params, lr=1e-2, betas=(0.9, 0.95))
    saved = copy.deepcopy(old.state_dict())  # a copy: as read back from a training-state file
    for entry in saved["state"].values():  # a looped optimiser keeps its step count as it came (a float64 default
        entry["step"] = entry["step"].double()  # dtype, say); the fused kernel wants fp32 on the parameter's device
    load_adamw_state(new, saved)
    assert new.param_groups[0]["fused"] is True  # not the saved group's None
    assert {(v["step"].dtype, v["step"].device) for v in new.state.values()} == {(torch.float32, new_params[0].device)}
    back = torch.optim.AdamW(_params(2), lr=1e-2)
    load_adamw_state(back, new.state_dict())
    assert not back.param_groups[0]["fused"]  # and a fused state loads where no fused kernel is wanted
    _steps(old, old_params, 4, 3)
    _steps(new, new_params, 4, 3)
    for a, b in zip(new_params, old_params):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_parameters_on_devices_without_the_kernel_or_strided_take_the_default_form(monkeypatch):
    from sa3_lora_studio.training import optimizer

    strided = torch.nn.Parameter(torch.randn(24, 16).T)  # the fused CPU kernel mis-updates strided tensors
    assert not adamw([strided, *_params(0)], lr=1e-3, betas=(0.9, 0.95)).defaults["fused"]
    assert adamw(iter(_params(0)), lr=1e-3, betas=(0.9, 0.95)).defaults["fused"]  # a generator is read once
    monkeypatch.setattr(optimizer, "fused_devices", lambda: ("cuda",))
    assert not adamw(_params(0), lr=1e-3, betas=(0.9, 0.95)).defaults["fused"]
