"""One attention-control layer for every editor: a processor on each attention layer of the UNet, and hooks
that an editor installs around a forward to read or rewrite attention probabilities.

A processor materialises softmax(QK^T / sqrt(d)) only when an installed hook reads its layer at that call;
everywhere else it runs diffusers' fused SDPA. Cross-attention maps are 77 keys wide, so reading them is
cheap; self-attention maps are HW x HW, so hooks read them only at the resolutions they edit.

Hooks see probabilities as (rows, heads, queries, keys). Rows follow the UNet batch: classifier-free
guidance runs cat([unconditional rows, conditional rows]), and an editor that runs several prompts per
input (Prompt-to-Prompt's [source, target]) lays each half out as (inputs, members).

A hook may also rewrite a cross-attention layer's value input (the context its values are projected from;
the keys keep the text): StyleDiffusion's per-step modulation of the text embedding. Such a layer then
runs the explicit path too.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from diffusers.models.attention_processor import Attention, AttentionProcessor, AttnProcessor2_0
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel


@dataclass(frozen=True)
class Site:
    """One attention layer: its module path, whether it attends to the text, and its place in the UNet."""

    name: str  # e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    cross: bool
    place: str  # "down" | "mid" | "up"

    @classmethod
    def of(cls, name: str) -> "Site":
        return cls(name, name.endswith("attn2"), name.split("_", 1)[0])


class AttentionHook:
    """Reads or rewrites the probabilities of the layers it asks for. The base hook touches nothing."""

    def reads(self, site: Site, queries: int) -> bool:
        return False

    def __call__(self, site: Site, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def modulates(self, site: Site) -> bool:
        """Whether `value_input` rewrites this layer's value input."""
        return False

    def value_input(self, site: Site, context: torch.Tensor) -> torch.Tensor:
        """The context (rows x keys x D) this layer's values are projected from; the keys keep `context`."""
        return context


class AttentionControl:
    """The hooks of one UNet's processors for the forwards run inside `using`."""

    def __init__(self) -> None:
        self.hooks: tuple[AttentionHook, ...] = ()

    @contextmanager
    def using(self, *hooks: AttentionHook) -> Iterator[None]:
        previous, self.hooks = self.hooks, hooks
        try:
            yield
        finally:
            self.hooks = previous

    def reads(self, site: Site, queries: int) -> bool:
        return any(hook.reads(site, queries) for hook in self.hooks)

    def __call__(self, site: Site, probs: torch.Tensor) -> torch.Tensor:
        for hook in self.hooks:
            if hook.reads(site, probs.shape[2]):
                probs = hook(site, probs)
        return probs

    def modulates(self, site: Site) -> bool:
        return any(hook.modulates(site) for hook in self.hooks)

    def value_input(self, site: Site, context: torch.Tensor) -> torch.Tensor:
        for hook in self.hooks:
            if hook.modulates(site):
                context = hook.value_input(site, context)
        return context


class ControlledAttnProcessor:
    """Fused SDPA unless a hook reads this layer or rewrites its value input; then explicit probabilities, passed
    through the hooks, and values projected from the hooks' value input."""

    def __init__(self, site: Site, control: AttentionControl) -> None:
        self.site, self.control, self.fused = site, control, AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        modulated = self.control.modulates(self.site)
        if not modulated and not self.control.reads(self.site, hidden_states.shape[1]):
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        assert hidden_states.ndim == 3 and not attn.norm_cross and attn.spatial_norm is None and attn.group_norm is None
        residual, context = hidden_states, hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, HW, d)
        key = attn.head_to_batch_dim(attn.to_k(context))  # (B*heads, keys, d)
        value = attn.head_to_batch_dim(attn.to_v(self.control.value_input(self.site, context) if modulated else context))
        probs = attn.get_attention_scores(query, key, None)  # (B*heads, HW, keys)
        rows = probs.shape[0] // attn.heads
        probs = self.control(self.site, probs.view(rows, attn.heads, *probs.shape[1:])).flatten(0, 1)
        out = attn.batch_to_head_dim(torch.bmm(probs.to(value.dtype), value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def controlled_processors(unet: UNet2DConditionModel) -> tuple[AttentionControl, dict[str, AttentionProcessor]]:
    """Our processor for every attention layer, keyed as `unet.attn_processors`, and the control they share.

    An editor installs its own with `unet.set_attn_processor(dict(processors))` at every edit, so editors
    sharing one UNet (eager and compiled, a benchmark's reference) never run on each other's hooks, and a
    compiled UNet always meets the processor objects it was traced with."""
    control = AttentionControl()
    processors = {key: ControlledAttnProcessor(Site.of(key.removesuffix(".processor")), control) for key in unet.attn_processors}
    return control, processors


def cross_sites(site: Site, queries: int) -> bool:
    return site.cross


@dataclass(eq=False)
class MapRecorder(AttentionHook):
    """Keeps the probabilities of the layers `where` selects, by layer name; with `grad`, inside the graph."""

    where: Callable[[Site, int], bool] = cross_sites
    grad: bool = False
    maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def reads(self, site: Site, queries: int) -> bool:
        return self.where(site, queries)

    def __call__(self, site: Site, probs: torch.Tensor) -> torch.Tensor:
        self.maps[site.name] = probs if self.grad else probs.detach()
        return probs


@dataclass(eq=False)
class ValueModulation(AttentionHook):
    """StyleDiffusion's value input at every cross-attention layer: each row's context c becomes c * scale + shift
    (keys keep c). `scale` and `shift` are rows x keys x D (rows as the UNet batch; a row left alone has scale 1
    and shift 0, which leaves c exactly), set before each forward; `scale` None: off."""

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    def modulates(self, site: Site) -> bool:
        return site.cross and self.scale is not None

    def value_input(self, site: Site, context: torch.Tensor) -> torch.Tensor:
        return context * self.scale.to(context.dtype) + self.shift.to(context.dtype)


@dataclass(eq=False)
class MapDistance(AttentionHook):
    """pix2pix-zero's cross-attention loss against `reference` maps, per sample, summed over the layers.

    One sample's term: squared distance summed over (queries, tokens), averaged over its rows (the two
    guidance halves x heads), as the official code reduces it. Rows are ordered (half, sample)."""

    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | float = 0.0

    def against(self, reference: dict[str, torch.Tensor]) -> "MapDistance":
        self.reference, self.loss = reference, 0.0
        return self

    def reads(self, site: Site, queries: int) -> bool:
        return site.cross

    def __call__(self, site: Site, probs: torch.Tensor) -> torch.Tensor:
        per_row = (probs - self.reference[site.name]).pow(2).sum(dim=(2, 3))  # (rows, heads)
        self.loss = self.loss + per_row.view(2, -1, probs.shape[1]).mean(dim=(0, 2))
        return probs


@dataclass
class CrossMapEdit:
    """How a target row's cross-attention maps are rebuilt from its source row's (Prompt-to-Prompt's R), per input.

    `replace` (inputs x 77 x 77): R[..., n] = sum_w source[..., w] M[w, n], plus target[..., n] keep[n] where
    `keep` (inputs x 77) is given: a refine written as such a matrix, so that one batch can mix replace and
    refine inputs. `refine`: (mapper, alphas), each inputs x 77: R = source[..., mapper] alphas + target
    (1 - alphas). `reweight` (inputs x 77) scales R's token columns afterwards, without renormalising (as the
    official code)."""

    replace: torch.Tensor | None = None
    refine: tuple[torch.Tensor, torch.Tensor] | None = None
    reweight: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    def __call__(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """source, target: inputs x heads x queries x 77."""
        if self.replace is not None:
            rebuilt = torch.einsum("bhqw,bwn->bhqn", source, self.replace.to(source.dtype))
            if self.keep is not None:
                rebuilt = rebuilt + target * self.keep[:, None, None, :].to(source.dtype)
        elif self.refine is not None:
            mapper, alphas = self.refine
            index = mapper.clamp(min=0)[:, None, None, :].expand(-1, *source.shape[1:3], -1)
            alphas = alphas[:, None, None, :].to(source.dtype)
            rebuilt = torch.gather(source, 3, index) * alphas + target * (1 - alphas)
        else:
            rebuilt = source
        return rebuilt if self.reweight is None else rebuilt * self.reweight[:, None, None, :].to(source.dtype)


@dataclass(eq=False)
class MapInjection(AttentionHook):
    """Prompt-to-Prompt's control: in each input's group of `members` rows (member 0 the source), the other
    members' maps are rebuilt from the source's at the current step, in the guidance halves `halves` names.

    Cross-attention: target <- alpha * R(source, target) + (1 - alpha) * target, alpha (inputs x 77) this step's
    row of the schedule (None or all zero: untouched). Self-attention: target <- source at layers with at most
    `self_max_queries` queries while `self_active`. Set `cross_alpha` and `self_active` before each step's forward."""

    cross_edit: CrossMapEdit = field(default_factory=CrossMapEdit)
    members: int = 2
    halves: str = "cond"  # "cond" | "uncond" | "both"
    self_max_queries: int = 32 * 32
    cross_alpha: torch.Tensor | None = None
    self_active: bool = False

    def reads(self, site: Site, queries: int) -> bool:
        if site.cross:
            return self.cross_alpha is not None
        return self.self_active and queries <= self.self_max_queries

    def __call__(self, site: Site, probs: torch.Tensor) -> torch.Tensor:
        groups = probs.view(2, -1, self.members, *probs.shape[1:])  # (half, input, member, heads, queries, keys)
        chosen = {"cond": [1], "uncond": [0], "both": [0, 1]}[self.halves]
        edited = []
        for half in range(2):
            rows = groups[half]
            if half in chosen:
                source = rows[:, :1]
                if site.cross:
                    alpha = self.cross_alpha[:, None, None, None, :].to(probs.dtype)  # input x 1 x 1 x 1 x 77
                    targets = torch.stack([self.cross_edit(source[:, 0], rows[:, m]) for m in range(1, self.members)], 1)
                    targets = alpha * targets + (1 - alpha) * rows[:, 1:]
                else:
                    targets = source.expand_as(rows[:, 1:])
                rows = torch.cat([source, targets], 1)
            edited.append(rows)
        return torch.stack(edited).flatten(0, 2)
