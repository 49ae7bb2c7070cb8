"""DDP (and a single process): whole weights on every rank, gradients all-reduced; everything else is the shared
behaviour of base.Backend. The fastest backend for every YOLO whose weights and optimizer state fit on a GPU:
YOLO's memory is activations, which grad_ckpt addresses (docs/backends.md)."""

from yoloscale.backend.base import Backend


class DDP(Backend):
    name = "ddp"
    layout = "ddp"
