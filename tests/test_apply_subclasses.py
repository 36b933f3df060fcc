"""precision.apply / describe / plan and train.distributed.is_unit_scaled find modules by isinstance, so a
user's subclass is never skipped silently; module_filter_fn excludes by name (issue 20, item 6)."""

from __future__ import annotations

import torch
from torch import nn

import unitscale.nn as unn
from unitscale.precision import QuantisedLinear, apply, describe, plan
from unitscale.precision.simulate import Simulate
from unitscale.train.distributed import is_unit_scaled


class MyLinear(nn.Linear):
    """A user's subclass with its own forward (a LoRA-style extra term) calling nn.Linear.forward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) + 0.0 * input.sum(-1, keepdim=True)

    def extra(self) -> str:
        return "kept"


class MyUnitLinear(unn.Linear):
    pass


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Linear(16, 16)
        self.mine = MyLinear(16, 16)
        self.unit = MyUnitLinear(16, 16)
        self.head = nn.Linear(16, 8)
        self.mha = nn.MultiheadAttention(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unit(self.mine(self.plain(x))))


def _quantised_cast_count(module: nn.Module, x: torch.Tensor, monkeypatch) -> int:
    calls = []
    orig = Simulate.cast_forward

    def counting(backend, t, role):
        calls.append(role)
        return orig(backend, t, role)

    monkeypatch.setattr(Simulate, "cast_forward", counting)
    module(x)
    return len(calls)


def test_subclasses_of_nn_linear_and_unit_linear_are_quantised(monkeypatch):
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 16)
    paths = {row.path: row.backend for row in plan(net, "fp8")}
    assert paths == {"plain": "simulate", "mine": "simulate", "unit": "simulate", "head": "simulate",
                     "mha": "none"}  # mha.out_proj belongs to the MHA row: its forward never calls it
    apply(net, "fp8")
    assert isinstance(net.mine, MyLinear) and isinstance(net.mine, QuantisedLinear)
    assert net.mine.extra() == "kept" and type(net.mine).__name__ == "QuantisedMyLinear"
    assert isinstance(net.unit.precision, Simulate) and isinstance(net.mine.precision, Simulate)
    assert type(net.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    for name in ("plain", "mine", "unit", "head"):  # two casts (weight, activation) per linear
        assert _quantised_cast_count(getattr(net, name), x, monkeypatch) == 2, name
    # The subclass's forward still runs: its output equals the quantised nn.Linear of the same weights.
    ref = apply(nn.Sequential(nn.Linear(16, 16)), "fp8")[0]
    ref.load_state_dict(net.mine.state_dict())
    assert torch.equal(net.mine(x), ref(x))
    assert "MyLinear.forward reaches the backend only through nn.Linear.forward" in describe(Net(), "fp8")
    # Applying twice keeps one class per subclass and the state_dict keys.
    keys = set(net.state_dict())
    apply(net, "fp8-paper")
    assert type(net.mine).__name__ == "QuantisedMyLinear" and set(net.state_dict()) == keys


def test_module_filter_fn_excludes_by_name():
    net = Net()
    keep = lambda module, fqn: fqn not in ("head", "unit")  # noqa: E731
    rows = {r.path: r for r in plan(net, "fp8", keep)}
    assert rows["head"].backend == "none" and rows["head"].reason == "excluded by module_filter_fn"
    apply(net, "fp8", module_filter_fn=keep)
    assert type(net.head) is nn.Linear and net.unit.precision is None
    assert isinstance(net.plain, QuantisedLinear) and isinstance(net.mine.precision, Simulate)
    seen = []
    apply(Net(), "fp8", module_filter_fn=lambda m, fqn: seen.append((type(m).__name__, fqn)) or True)
    assert ("MyLinear", "mine") in seen and ("MyUnitLinear", "unit") in seen
    assert "excluded by module_filter_fn" in describe(Net(), "fp8", keep)


def test_is_unit_scaled_sees_subclasses_of_unitscale_modules():
    assert is_unit_scaled(nn.Sequential(MyUnitLinear(4, 4)))
    assert is_unit_scaled(nn.Sequential(unn.Linear(4, 4)))
    assert not is_unit_scaled(nn.Sequential(nn.Linear(4, 4), MyLinear(4, 4)))
