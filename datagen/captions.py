"""Captions for real inputs with BLIP (transformers), as pix2pix-zero does; an explicit caption wins."""
from __future__ import annotations

import torch
from PIL import Image
from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

from datagen.runtime import model_unavailable, resolve_device
from datagen.tokenizer import clip_tokenizer


class Captioner:
    def __init__(self, model: BlipForConditionalGeneration, image_processor, tokenizer, max_new_tokens: int = 30) -> None:
        self.model, self.image_processor, self.tokenizer = model.eval().requires_grad_(False), image_processor, tokenizer
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(cls, id: str, device: str = "auto", max_new_tokens: int = 30) -> "Captioner":
        try:
            processor = BlipProcessor.from_pretrained(id)
            model = BlipForConditionalGeneration.from_pretrained(id)
        except (OSError, ValueError) as error:
            raise model_unavailable("BLIP captioner", id, error) from None
        return cls(model.to(resolve_device(device)), processor.image_processor, processor.tokenizer, max_new_tokens)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "auto", max_new_tokens: int = 8) -> "Captioner":
        """Random weights, real BLIP classes: captions are gibberish but the code path is the real one."""
        torch.manual_seed(seed)
        tokens = dict(vocab_size=49408, bos_token_id=49406, sep_token_id=49407, eos_token_id=49407, pad_token_id=49407)
        config = BlipConfig(
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **tokens),
            vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8),
        )
        processor = BlipImageProcessor(size={"height": 32, "width": 32})
        return cls(BlipForConditionalGeneration(config).to(resolve_device(device)), processor, clip_tokenizer(), max_new_tokens)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[str]:
        """Images B x 3 x H x W in [0, 1] -> one caption each."""
        pil = [Image.fromarray((img.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()) for img in images]
        pixels = self.image_processor(pil, return_tensors="pt").pixel_values.to(self.model.device, self.model.dtype)
        ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
