"""Tiny random-weight components shared by the engine tests (built once per test module)."""
import torch

from datagen.backbone import tiny_backbone

RESOLUTION = 64


def make_backbone():
    return tiny_backbone(seed=0).to(torch.device("cpu"), torch.float32)


def random_direction(backbone, scale: float = 1.0, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(1, 77, backbone.text_encoder.config.hidden_size, generator=g)
