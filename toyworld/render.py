"""Scenes -> RGB images and per-object masks, drawn with signed distance functions in torch.

Every shape is a signed distance field in pixel units (negative inside), so one formula gives
anti-aliased edges (coverage = clamp(0.5 - d, 0, 1)), outlines (a band of the field) and masks, and a
whole batch renders on any device at once: training draws fresh scenes every step instead of
reading a dataset.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from toyworld.world import COLOUR_RGB, SHAPES, Scenes

OUTLINE_WIDTH = 1.6       # pixels, the stroke of the outline style
OBJECT_STRIPE_PERIOD = 4.0
BACKGROUND_STRIPE_PERIOD = 6.0
DOT_RADIUS = 0.3          # of the object's radius
MAX_VERTICES = 10


def _regular_vertices(corners: int, radius: float, phase: float, inner: float | None = None) -> np.ndarray:
    """Vertices of a regular polygon (or a star, alternating `radius` and `inner`) around the origin, y down."""
    steps = corners * (2 if inner else 1)
    angles = phase + 2 * np.pi * np.arange(steps) / steps
    radii = np.where(np.arange(steps) % 2 == 1, inner, radius) if inner else np.full(steps, radius)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _padded(vertices: np.ndarray) -> np.ndarray:
    # Repeating the last vertex adds zero-length edges, which change neither distance nor inside test.
    return np.concatenate([vertices, np.repeat(vertices[-1:], MAX_VERTICES - len(vertices), axis=0)])


# Unit-radius outlines, scaled so the four shapes cover similar areas; circles are exact (not polygons).
UNIT_POLYGONS = torch.tensor(np.stack([
    _padded(_regular_vertices(MAX_VERTICES, 1.0, 0.0)),              # circle: unused, its field is analytic
    _padded(_regular_vertices(4, 1.2, np.pi / 4)),                   # square
    _padded(_regular_vertices(3, 1.35, -np.pi / 2) + [0, 0.2]),      # triangle, point up, centred on its area
    _padded(_regular_vertices(5, 1.35, -np.pi / 2, inner=0.6)),      # five-pointed star
]), dtype=torch.float32)
assert SHAPES.index("circle") == 0


def polygon_distance(points: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Signed distance from points (B x P x 2) to closed polygons (B x V x 2), negative inside (even-odd rule)."""
    start = vertices[:, None, :, :]                               # B x 1 x V x 2
    edge = torch.roll(vertices, 1, dims=1)[:, None] - start       # edge from vertex i to vertex i-1
    offset = points[:, :, None, :] - start                        # B x P x V x 2
    t = ((offset * edge).sum(-1) / (edge * edge).sum(-1).clamp_min(1e-9)).clamp(0, 1)
    distance = (offset - edge * t[..., None]).norm(dim=-1).amin(dim=2)
    above_start = points[:, :, None, 1] >= start[..., 1]
    below_end = points[:, :, None, 1] < start[..., 1] + edge[..., 1]
    left_of_edge = edge[..., 0] * offset[..., 1] > edge[..., 1] * offset[..., 0]
    crossing = (above_start & below_end & left_of_edge) | (~above_start & ~below_end & ~left_of_edge)
    inside = crossing.sum(dim=2) % 2 == 1
    return torch.where(inside, -distance, distance)


def coverage(distance: torch.Tensor) -> torch.Tensor:
    """Share of a pixel inside a field's zero set: a box-filtered edge, one pixel wide."""
    return (0.5 - distance).clamp(0, 1)


def stripes(points: torch.Tensor, angle: torch.Tensor, period: float) -> torch.Tensor:
    """Soft 0/1 bands across direction `angle` (B), for points B x P x 2."""
    direction = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    phase = (points * direction[:, None]).sum(-1) * (2 * math.pi / period)
    return (0.5 + 1.5 * torch.sin(phase)).clamp(0, 1)


def render(scenes: Scenes, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Images N x 3 x S x S in [0, 1] and object masks N x 2 x S x S in [0, 1] (zero for an absent object).

    A mask covers the object's whole area, the inside of an outline drawing too."""
    t = {name: torch.as_tensor(np.asarray(getattr(scenes, name)), device=device) for name in (
        "present", "shape", "colour", "striped", "dot", "centre", "radius", "tint", "stripe_angle",
        "background", "dark", "shade", "background_angle", "outline")}
    n, size = len(scenes), scenes.size
    axis = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([xs, ys], dim=-1).reshape(1, -1, 2).expand(n, -1, -1)        # N x P x 2

    # Background: a base shade, darkened or lightened towards one side (gradient) or in bands (stripes).
    towards = 1 - 2 * t["dark"].float()                                                 # lighter on dark grounds
    across = torch.stack([torch.cos(t["background_angle"]), torch.sin(t["background_angle"])], -1)
    ramp = ((points - size / 2) * across[:, None]).sum(-1) / size + 0.5                 # 0..1 across the image
    bands = stripes(points, t["background_angle"], BACKGROUND_STRIPE_PERIOD)
    change = torch.stack([torch.zeros_like(ramp), 0.3 * ramp, 0.14 * bands])[t["background"], torch.arange(n)]
    image = (t["shade"][:, None, :] + (towards[:, None] * change)[..., None]).clamp(0, 1)  # N x P x 3

    palette = torch.as_tensor(COLOUR_RGB, device=device)
    polygons = UNIT_POLYGONS.to(device)
    masks = []
    for k in range(t["present"].shape[1]):
        radius, centre = t["radius"][:, k], t["centre"][:, k]
        local = points - centre[:, None]
        circle = local.norm(dim=-1) - radius[:, None]
        polygon = polygon_distance(local, polygons[t["shape"][:, k]] * radius[:, None, None])
        distance = torch.where((t["shape"][:, k] == 0)[:, None], circle, polygon)
        area = coverage(distance) * t["present"][:, k, None]
        masks.append(area)

        colour = (palette[t["colour"][:, k]] + t["tint"][:, k]).clamp(0, 1)[:, None]   # N x 1 x 3
        band = stripes(local, t["stripe_angle"][:, k], OBJECT_STRIPE_PERIOD) * t["striped"][:, k, None]
        dot = coverage(local.norm(dim=-1) - DOT_RADIUS * radius[:, None]) * t["dot"][:, k, None]
        outline = t["outline"][:, None]
        # Filled: stripes are a darker shade of the colour, the dot black or white against the colour.
        # Outline: one stroke colour; stripes become hatching inside the stroke, the dot a solid spot.
        dark_shade = colour * 0.35
        contrast = torch.where(colour.mean(-1, keepdim=True) > 0.5, 0.05, 0.97).expand_as(colour)
        filled = colour + band[..., None] * (dark_shade - colour)
        filled = filled + dot[..., None] * (contrast - filled)
        stroke = coverage(torch.maximum(distance, -distance - OUTLINE_WIDTH))
        hatch = coverage(distance) * (stripes(local, t["stripe_angle"][:, k], OBJECT_STRIPE_PERIOD) > 0.85).float()
        ink = torch.maximum(stroke, torch.maximum(hatch * t["striped"][:, k, None], dot))
        paint = torch.where(outline[..., None], colour.expand_as(image), filled)
        alpha = torch.where(outline, ink, torch.ones_like(ink)) * area
        image = image + alpha[..., None] * (paint - image)

    images = image.reshape(n, size, size, 3).permute(0, 3, 1, 2).contiguous()
    return images, torch.stack(masks, 1).reshape(n, -1, size, size)
