"""The two checks ``init="keep"`` runs on the example after rewriting: tie calibration, exactness.

* **Ties.** A parameter used by several ops (GPT-2's embedding table that is also the readout) gets one
  gradient contribution per use, each the original contribution times that use's own constant (Theorem
  5.2 per use). Each use enters through ``scaled(w, 1, r)``; r is set so every use has the same constant
  κ* (the geometric mean), measured as κ = ⟨a, b⟩/⟨a, a⟩ between the original (a) and converted (b)
  contributions for a fixed random probe of the outputs. Weight edges are cut, so any r is legal; the
  parameter's gradient is then κ*· the original gradient.
* **Exactness.** Every converted tensor must equal its factor × the original tensor. Both graphs run on the
  example (eval semantics) and 2048 evenly spaced entries of each tensor are compared; the first op that
  breaks it is reported by op, module path and source line, and the conversion refuses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from unitscale.scale import scaled
from unitscale.transforms._capture import EvalSemantics, describe_node
from unitscale.transforms._convert import Converter

_SAMPLES = 2048
_TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-3}
_HALF_TOLERANCE = 5e-2


class _PerUse(EvalSemantics):
    """Eval semantics where chosen edges (u → v) read a fresh leaf copy of u, to get each use's gradient."""

    def __init__(self, gm: fx.GraphModule, edges: set[tuple[str, str]]):
        super().__init__(gm)
        self.edges, self.leaves = edges, {}

    def map_nodes_to_values(self, args: Any, n: fx.Node) -> Any:
        def load(a: fx.Node) -> Any:
            value = self.env[a]
            if (a.name, n.name) in self.edges:
                leaf = value.detach().requires_grad_(True)
                self.leaves[(a.name, n.name)] = leaf
                return leaf
            return value

        return fx.node.map_arg(args, load)


class _Keep(fx.Interpreter):
    """Runs a graph, keeping the values of chosen nodes."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted, self.kept = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.wanted:
            self.kept[n] = value
        return value


def _probe_loss(outputs: list[Any], seed: int = 0) -> Tensor:
    """A random probe of one output, of the most precise dtype: the scalar one (a loss) if any, else the
    first. One output:
    Theorem 5.2 holds for a backward from any single output, not for a mix (a loss and the logits it is
    computed from get different constants), and the ratio between two uses is the same for every output."""
    candidates = [y for y in outputs if isinstance(y, Tensor) and y.is_floating_point() and y.requires_grad]
    if not candidates:
        raise ValueError("unit_scale: the model has no differentiable floating output to calibrate ties on")
    precise = min(torch.finfo(t.dtype).eps for t in candidates)  # HF computes its loss in float32
    candidates = [t for t in candidates if torch.finfo(t.dtype).eps == precise]
    y = next((t for t in candidates if t.numel() == 1), candidates[0])
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (y * probe.to(y.dtype)).sum()


def calibrate_ties(cv: Converter, reference: fx.GraphModule, converted: fx.GraphModule, flat: list) -> None:
    """Give each use of a tied parameter the same gradient constant (see the module docstring)."""
    tied = {t: [cv._wrapped.get(edge) for edge in edges] for t, edges in cv.uses.items() if len(edges) > 1}
    tied = {t: uses for t, uses in tied.items() if any(n is not None and n.target is scaled for n in uses)}
    if not tied:
        return
    edges = {(u.name, v.name) for t in tied for u, v in cv.uses[t]}
    runner = _PerUse(reference, edges)
    with torch.enable_grad():
        out = runner.run(*flat, enable_io_processing=False)
        grads = torch.autograd.grad(_probe_loss(list(out)), list(runner.leaves.values()), allow_unused=True)
    original = dict(zip(runner.leaves, grads, strict=True))
    nodes = {n for uses in tied.values() for n in uses if n is not None}
    for node in nodes:  # any factor but 1, so each use has its own tensor (scaled(w, 1, 1) is w itself)
        node.update_arg(2, 0.5)
    keeper = _Keep(converted, nodes)
    with torch.enable_grad():
        out = keeper.run(*flat, enable_io_processing=False)
        values = [keeper.kept[n] for n in nodes]
        grads = torch.autograd.grad(_probe_loss(list(out)), values, allow_unused=True)
    converted_grads = dict(zip(nodes, grads, strict=True))
    for target, uses in tied.items():
        pairs = {}
        for (u, v), node in zip(cv.uses[target], uses, strict=True):
            a, b = original.get((u.name, v.name)), converted_grads.get(node) if node is not None else None
            if a is not None and b is not None:
                pairs[node] = (a, b)
        # A use whose true gradient vanishes (a key bias: softmax ignores a shift shared by every key) has
        # only rounding noise as its gradient, which fixes no constant: it counts as a use with no gradient.
        # √eps of the gradients' dtype: far above their rounding noise, far below a real ratio between uses
        norms = {node: float(a.double().norm()) for node, (a, _) in pairs.items()}
        eps = max((torch.finfo(a.dtype).eps for a, _ in pairs.values()), default=0.0)
        floor = max(norms.values(), default=0.0) * eps**0.5
        kappas = {}
        for node, (a, b) in pairs.items():
            if not norms[node] > floor:
                continue
            a, b = a.double().flatten(), b.double().flatten()
            kappas[node] = float(a @ b / (a @ a))
        positive = [k for k in kappas.values() if k > 0]
        if len(positive) != len(kappas) or not positive:
            raise ValueError(
                f"unit_scale: tied parameter {target!r} has uses with gradient constants {kappas}"
            )
        reference_kappa = math.exp(sum(math.log(k) for k in positive) / len(positive))
        for node in uses:
            if node is not None:  # a use with no gradient on the example keeps its own constant
                node.update_arg(2, reference_kappa / kappas[node] if node in kappas else 1.0)
    converted.recompile()


def _sample(value: Any) -> Tensor | None:
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.numel() == 0:
        return None
    flat = value.detach().flatten()
    idx = torch.linspace(0, flat.numel() - 1, min(flat.numel(), _SAMPLES)).round().long()
    return flat[idx].double()


def verify(cv: Converter, reference: fx.GraphModule, converted: fx.GraphModule, flat: list) -> None:
    """Raise ValueError naming the first op whose converted value is not factor × original."""
    # Activations only: parameters are rescaled in place, and the ops consuming them are what is checked.
    mapped = {n: cv.env[n] for n in cv.original.nodes if n in cv.live and n not in cv.param_only
              and isinstance(cv.env.get(n), fx.Node) and n not in cv.absorbed}  # fmt: skip
    names = {n.name: n for n in mapped}
    originals: dict[str, Tensor] = {}
    # A float32 tensor computed from bfloat16 weights carries bfloat16 rounding: the coarsest parameter
    # dtype bounds the precision of everything.
    dtypes = {p.dtype for p in converted.parameters() if p.is_floating_point()}
    coarsest = max((_TOLERANCE.get(d, _HALF_TOLERANCE) for d in dtypes), default=0.0)
    with torch.no_grad():
        EvalSemantics(
            reference, lambda n, v: originals.__setitem__(n.name, _sample(v)) if n.name in names else None
        ).run(*flat, enable_io_processing=False)
        keeper = _Keep(converted, set(mapped.values()))
        keeper.run(*flat, enable_io_processing=False)
    for node, new in mapped.items():
        want, got = originals.get(node.name), _sample(keeper.kept.get(new))
        if want is None or got is None or want.shape != got.shape:
            continue
        value = keeper.kept[new]
        tol = max(_TOLERANCE.get(value.dtype, _HALF_TOLERANCE), coarsest)
        scaled_want = want * cv.c(node)
        finite = torch.isfinite(scaled_want)
        same_specials = torch.equal(finite, torch.isfinite(got)) and torch.equal(
            scaled_want[~finite], got[~finite]
        )
        bound = tol * float(scaled_want[finite].abs().max()) if finite.any() else 0.0
        error = float((got[finite] - scaled_want[finite]).abs().max()) if finite.any() else 0.0
        if not same_specials or error > bound + 1e-30:
            rel = error / (bound / tol) if bound else math.inf
            raise ValueError(
                f"unit_scale(init='keep') would change the model's function at {describe_node(node)}: the "
                f"converted value differs from {cv.c(node):.6g} × the original by {rel:.2e} (relative; "
                f"allowed {tol:g}). A user rule for this op may be wrong; otherwise please report it."
            )
