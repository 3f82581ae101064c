"""CLIP scores of an edit: did the picture move from the source text toward the target text, and how far.

With unit-length CLIP features i0 (input image), i1 (edited image), s (task.source_text), t (task.target_text)
and CLIP's logit scale tau (exp of the learned temperature; 100 for OpenAI's models):

    p(i)           = exp(tau i.t) / (exp(tau i.s) + exp(tau i.t))   CLIP's probability of the target text
    clip_gain      = p(i1) - p(i0)                                   in [-1, 1]; the paper keeps >= 0.10
    clip_direction = cos(i1 - i0, t - s)                             InstructPix2Pix's directional similarity
    clip_image     = i0 . i1                                         InstructPix2Pix's image-image similarity

and the raw similarities clip_input_source = i0.s, clip_input_target = i0.t, clip_edited_source = i1.s,
clip_edited_target = i1.t. `cos(a, b) = a.b / max(|a| |b|, 1e-8)`, so an unchanged image has direction 0.

The gain is measured as a probability rather than a raw similarity because CLIP similarities of one image
to two captions differ by a few hundredths: a softmax over the two texts turns "more dog than cat" into
a number whose 0.10 means the same for every model and prompt pair.

Two backends sit behind one `ClipEncoder` interface: open_clip models (the real ViT-L-14/openai and a
registered tiny config) and transformers `CLIPModel`s (hub id or local folder, e.g. the toy world's).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from filters.loading import ModelWrapper, explain_missing
from filters.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, interpolation_name, load_processor, pixel_transform

TINY_OPEN_CLIP = "pairforge-tiny-clip"


def clip_scores(input_features: Tensor, edited_features: Tensor, source_text: Tensor, target_text: Tensor, logit_scale: float) -> dict[str, Tensor]:
    """The module docstring's scores for B pairs: image features B x D, text features D (normalised here)."""
    i0, i1 = F.normalize(input_features.float(), dim=-1), F.normalize(edited_features.float(), dim=-1)
    s, t = F.normalize(source_text.float(), dim=-1), F.normalize(target_text.float(), dim=-1)
    sims = {
        "clip_input_source": i0 @ s,
        "clip_input_target": i0 @ t,
        "clip_edited_source": i1 @ s,
        "clip_edited_target": i1 @ t,
    }
    # Softmax over two texts is a sigmoid of the scaled difference.
    p_input = torch.sigmoid(logit_scale * (sims["clip_input_target"] - sims["clip_input_source"]))
    p_edited = torch.sigmoid(logit_scale * (sims["clip_edited_target"] - sims["clip_edited_source"]))
    return {
        "clip_gain": p_edited - p_input,
        "clip_direction": F.cosine_similarity(i1 - i0, (t - s).expand_as(i0), dim=-1),
        "clip_image": (i0 * i1).sum(-1),
        **sims,
    }


class ClipEncoder(ModelWrapper):
    """A CLIP model's two towers: images B x 3 x H x W in [0, 1] and texts in, unit-length float32 features out."""

    def __init__(self, preprocess: nn.Module, logit_scale: float):
        super().__init__()
        self.preprocess = preprocess
        self.logit_scale = logit_scale

    def image_features(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def text_features(self, texts: list[str]) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        pixels = self.preprocess(images.to(self.device, self.dtype))
        return F.normalize(self.image_features(pixels).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> Tensor:
        return F.normalize(self.text_features(texts).float(), dim=-1)


class OpenClipEncoder(ClipEncoder):
    """An open_clip model; `from_pretrained("ViT-L-14", "openai")` is the real scorer, `tiny()` a random one."""

    def __init__(self, model: nn.Module, tokenizer):
        cfg = model.visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else tuple(cfg["size"])
        square = (size, size) if isinstance(size, int) else size
        # open_clip's "shortest" mode (its pretrained CLIPs') resizes the shorter side and cuts out the centre;
        # the other modes keep the whole picture, here by squashing it to the square.
        crop = square if cfg["resize_mode"] == "shortest" else None
        preprocess = pixel_transform(size if crop else square, cfg["mean"], cfg["std"], cfg["interpolation"], crop=crop)
        super().__init__(preprocess, logit_scale=model.logit_scale.exp().item())
        self.model = model
        self.tokenizer = tokenizer

    def image_features(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def text_features(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    @classmethod
    def from_pretrained(cls, name: str = "ViT-L-14", pretrained: str | None = "openai") -> OpenClipEncoder:
        """`name` is an open_clip architecture (or `hf-hub:`/`local-dir:` source); `pretrained` a tag or checkpoint file."""
        import open_clip

        # Tags trained with QuickGELU (OpenAI's) only warn and build plain GELU unless told: features would be off.
        quick_gelu = bool(pretrained and open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"))
        # open_clip reports a failed download or an unknown tag as RuntimeError.
        with explain_missing(f"open_clip {name} ({pretrained})", errors=(OSError, RuntimeError)):
            model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu)
        return cls(model, open_clip.get_tokenizer(name))

    @classmethod
    def tiny(cls, seed: int = 0) -> OpenClipEncoder:
        """A 2-layer, 32-wide random CLIP (config in model_configs/) with the real tokenizer: offline tests and smoke runs."""
        import open_clip

        if TINY_OPEN_CLIP not in open_clip.list_models():
            open_clip.add_model_config(Path(__file__).parent / "model_configs")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
        return cls(model, open_clip.get_tokenizer(TINY_OPEN_CLIP))


class TransformersClipEncoder(ClipEncoder):
    """A transformers `CLIPModel` from a hub id or a local folder (the toy world saves one in toyworld/weights/clip/)."""

    def __init__(self, model: nn.Module, tokenizer, preprocess: nn.Module):
        super().__init__(preprocess, logit_scale=model.logit_scale.exp().item())
        self.model = model
        self.tokenizer = tokenizer

    def image_features(self, pixels: Tensor) -> Tensor:
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def text_features(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> TransformersClipEncoder:
        from transformers import CLIPModel

        with explain_missing(name_or_path):
            model = CLIPModel.from_pretrained(name_or_path)
            tokenizer, image_processor = load_processor(name_or_path)
        if image_processor is None:
            side = model.config.vision_config.image_size
            preprocess = pixel_transform(side, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, crop=side)
        else:
            crop = (image_processor.crop_size["height"], image_processor.crop_size["width"])
            mode = interpolation_name(image_processor.resample)
            preprocess = pixel_transform(image_processor.size["shortest_edge"], image_processor.image_mean, image_processor.image_std, mode, crop=crop)
        return cls(model, tokenizer, preprocess)


class ClipScorer:
    """Scores pairs against the task's two texts, whose features are computed once."""

    undefined_reasons: dict[str, str] = {}

    def __init__(self, encoder: ClipEncoder, source_text: str, target_text: str):
        self.encoder = encoder
        self.source_features, self.target_features = encoder.encode_texts([source_text, target_text])

    def __call__(self, inputs: Tensor, edited: Tensor) -> dict[str, Tensor]:
        input_features, edited_features = self.encoder.encode_images(torch.cat([inputs, edited])).chunk(2)
        return clip_scores(input_features, edited_features, self.source_features, self.target_features, self.encoder.logit_scale)
