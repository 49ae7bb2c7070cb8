"""MuSGD (Ultralytics' Muon + SGD hybrid) on sharded parameters: FSDP2's DTensor shards and DeepSpeed ZeRO's flat
partitions.

Ultralytics' `MuSGD` (ultralytics/optim/muon.py) updates each 2-D/4-D parameter with `lr x 0.2` times the
Newton-Schulz orthogonalisation of its Nesterov momentum update, plus an ordinary SGD step at `lr x 1.0`. Everything
in it is elementwise except the orthogonalisation, which needs each whole matrix. Under DDP the optimizer holds whole
parameters and Ultralytics' class runs as it is. Under sharding each rank holds a piece of every parameter (FSDP2) or
a slice of a flat buffer (ZeRO), so `ShardedMuSGD` does the elementwise work on its pieces, and for the Muon groups
only assembles the whole update matrices, orthogonalises them with Ultralytics' own function (every rank the same
matrices, in the same order, so the batched Newton-Schulz call is the same as under DDP), and keeps its own piece of
the result. That is one collective per Muon group and step, of the size of the update (the model's 2-D/4-D
weights).

Where the pieces are is the backend's knowledge: it attaches a `layout` (backend/fsdp.py `DTensorLayout`,
backend/zero.py `ZeroLayout`) after the model is sharded.
"""

from __future__ import annotations

from typing import Protocol

import torch

from yoloscale.compat import muon_update

MUON_SCALE, SGD_SCALE = 0.2, 1.0  # Ultralytics' trainer: partial(MuSGD, muon=0.2, sgd=1.0)


class MatrixLayout(Protocol):
    """How the optimizer's tensors of one Muon group map to whole parameters."""

    def whole(self, params: list[torch.Tensor], local: list[torch.Tensor]) -> list[torch.Tensor]:
        """Collective: the whole parameter-shaped tensors from this rank's `local` pieces of `params`."""

    def local(self, params: list[torch.Tensor], whole: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's pieces of `whole` (the inverse of `whole`, no communication)."""


def orthogonalize(updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """Ultralytics' Muon orthogonalisation of whole update matrices (Newton-Schulz in bf16, batched by shape, scaled
    by the matrix aspect), without its momentum: `muon_update` with beta 0 returns exactly the orthogonalised input."""

    return muon_update()(updates, [torch.zeros_like(u) for u in updates], beta=0.0, nesterov=False)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


class ShardedMuSGD(torch.optim.Optimizer):
    """Ultralytics' MuSGD step on the pieces a rank holds; numerically the same update as MuSGD on whole tensors
    (tests/distributed: FSDP2 and ZeRO against DDP). `layout` is attached by the backend before the first step."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        use_muon: bool = False,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "use_muon": use_muon,
        }
        super().__init__(params, defaults)
        self.muon, self.sgd = MUON_SCALE, SGD_SCALE
        self.layout: MatrixLayout | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in params:
                if len(self.state[p]) == 0:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    if group["use_muon"]:
                        self.state[p]["momentum_buffer_SGD"] = torch.zeros_like(p)
            data = [_local(p) for p in params]
            grads = [_local(p.grad) for p in params]
            if group["use_muon"]:
                if self.layout is None:
                    raise RuntimeError("ShardedMuSGD stepped before the backend attached its layout")
                # Ultralytics' muon_update, its elementwise part on the pieces: momentum, then the Nesterov update
                buffers = [_local(self.state[p]["momentum_buffer"]) for p in params]
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads, alpha=1 - momentum)
                if nesterov:
                    updates = list(torch._foreach_mul(buffers, momentum))
                    torch._foreach_add_(updates, grads, alpha=1 - momentum)
                else:
                    updates = [b.clone() for b in buffers]
                whole = orthogonalize(self.layout.whole(params, updates))
                torch._foreach_add_(data, self.layout.local(params, whole), alpha=-(lr * self.muon))
                buffers = [_local(self.state[p]["momentum_buffer_SGD"]) for p in params]
                lr *= self.sgd
            else:
                buffers = [_local(self.state[p]["momentum_buffer"]) for p in params]
            # the SGD part, as in MuSGD: weight decay on the (already Muon-updated) weights
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, data, alpha=group["weight_decay"])
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads)
            steps = torch._foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers
            torch._foreach_add_(data, steps, alpha=-lr)
        return loss
