"""EMA of the weights with Ultralytics' ModelEMA semantics, on every backend, without gathering the model per step.

Ultralytics' ModelEMA deep-copies the model, which fails on FSDP (pytorch#82070) and copies empty placeholders
under ZeRO-3. Here each rank keeps the EMA of its own piece of every floating-point parameter and buffer
(backend/tensors.py says what "its piece" is per backend) and updates it with the same formula:

    d = decay x (1 - exp(-updates / tau));  ema = d x ema + (1 - d) x model

Full tensors are assembled only to validate or save (once per epoch or checkpoint): `full_state_dict()` is a
collective, and `load_into()` puts the result into a plain, unsharded copy of the model for Ultralytics' validator
and exporter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from yoloscale.backend.tensors import full_tensor, local_tensor, shard_like


def _float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> parameter or buffer, floating point only, named as in the model's state dict."""
    keys = set(model.state_dict())
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    return {k: v for k, v in named.items() if k in keys and v.is_floating_point()}


class ShardedEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.decay, self.tau, self.updates = decay, tau, updates
        self.like = _float_tensors(model)  # the model's tensors: where each piece lives and how it is sharded
        with torch.no_grad():
            self.shadow = {k: local_tensor(v).detach().float().clone() for k, v in self.like.items()}

    def update(self, model: nn.Module) -> None:
        """One EMA step from the model's current local pieces (no communication, no host sync)."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        with torch.no_grad():
            ema = list(self.shadow.values())
            now = [local_tensor(v).float() for v in self.like.values()]
            if any(e.device != n.device for e, n in zip(ema, now)):
                # Follow the model's pieces: under FSDP2 offload=params a resume loaded the EMA where the shards
                # were before FSDP2's first forward put them in CPU memory ("cuda:0 and cpu").
                self.shadow = {k: e.to(n.device) for (k, e), n in zip(self.shadow.items(), now)}
                ema = list(self.shadow.values())
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, now, alpha=1 - d)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective under sharding: the whole EMA, on every rank."""
        return {k: full_tensor(v, self.like[k]) for k, v in self.shadow.items()}

    def load_full_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Resume: take this rank's pieces of a whole EMA (any world size or backend saved it)."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}...")
        self.shadow = {k: shard_like(state[k], self.like[k]).float() for k in self.shadow}
        self.updates = updates

    def state_dict(self) -> dict:
        """Collective under sharding: the update count and the whole EMA ('tensors' goes to ema.safetensors)."""
        return {"updates": self.updates, "tensors": self.full_state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.load_full_state_dict(state["tensors"], state["updates"])

    def load_into(self, model: nn.Module) -> nn.Module:
        """Collective: copy the whole EMA into a plain (unsharded) model, e.g. the one used for validation."""
        full = self.full_state_dict()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in full:
                    v.copy_(full[k])
        return model


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective under sharding: the model's own floating-point weights, whole, on every rank."""
    return {k: full_tensor(local_tensor(v).detach(), v) for k, v in _float_tensors(model).items()}
