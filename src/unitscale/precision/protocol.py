"""The interface every matmul backend implements (``Exact``, ``Simulate``, ``FP8``, ``INT4``).

Model code and ops type their ``precision`` argument/attribute as ``Backend | None`` (None = exact, in the
compute dtype). A backend computes

    linear:  y = alpha · (x Wᵀ) + c    ∂x = beta_x · (∂y W),  ∂W = beta_w · (∂yᵀ x),  ∂c = beta_b · Σ_rows ∂y
    matmul:  y = alpha · (a b)         ∂a = beta_a · (∂y bᵀ), ∂b = beta_b · (aᵀ ∂y)

and decides the casts of the matmul inputs (``cast_forward``) and of the output gradient
(``cast_backward``).
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

Role = Literal["weight", "activation"]
"""What a matmul operand is, for its forward cast."""


@runtime_checkable
class Backend(Protocol):
    """A matmul backend (see the module docstring for the maths)."""

    name: str

    def cast_forward(self, t: Tensor, role: Role) -> Tensor:
        """The value a matmul input takes going forward."""
        ...

    def cast_backward(self, grad: Tensor) -> Tensor:
        """The value a matmul's output gradient takes going back."""
        ...

    def linear(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        alpha: float = 1.0,
        beta_x: float = 1.0,
        beta_w: float = 1.0,
        beta_b: float = 1.0,
    ) -> Tensor:
        """y = alpha · x Wᵀ + bias with backward factors beta_x, beta_w, beta_b."""
        ...

    def matmul(
        self,
        a: Tensor,
        b: Tensor,
        *,
        alpha: float = 1.0,
        beta_a: float = 1.0,
        beta_b: float = 1.0,
        roles: tuple[Role, Role] = ("activation", "activation"),
    ) -> Tensor:
        """y = alpha · a @ b (batched, broadcasting) with backward factors beta_a, beta_b."""
        ...
