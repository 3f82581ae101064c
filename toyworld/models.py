"""The toy world's models: standard diffusers/transformers classes built from small configs.

Sizes are chosen for 32 x 32 images and a 25 MB budget for all weights in fp16. The text towers keep
CLIP's 49,408-token vocabulary (the real BPE tokenizer, so sentence banks tokenize as for SD), which
makes their embedding tables most of their size: their width stays 32. The captioner decodes words
of this world only, with a word-level BERT vocabulary of a few dozen entries, as BLIP's hub
processors do with BERT's.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    ViTImageProcessor,
)

from datagen.tokenizer import clip_tokenizer
from toyworld.world import BACKGROUNDS, COLOURS, SHAPES, TONES

WEIGHTS = Path(__file__).resolve().parent / "weights"   # the committed world (model=toy)
IMAGE_SIZE = 32
TEXT_WIDTH = 32        # the text encoder's hidden size = the UNet's cross_attention_dim
LATENT_CHANNELS = 4
CLIP_TOKENS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# Images reach every transformers model as [-1, 1], the range the VAE and UNet use too.
HALF = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def clip_model() -> CLIPModel:
    return CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=4,
                         num_attention_heads=4, **CLIP_TOKENS),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=4, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=4, num_attention_heads=4),
        projection_dim=64,
    ))


def clip_processor() -> CLIPProcessor:
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                do_convert_rgb=True, **HALF)
    return CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer())


def autoencoder() -> AutoencoderKL:
    """Two blocks: 32 x 32 x 3 images <-> 16 x 16 x 4 latents, a factor of 2 (SD: 8)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def unet() -> UNet2DConditionModel:
    """SD's UNet layout at 16 x 16: cross-attention at 16 and 8 and in the middle, none at 4.

    One head per attention layer (diffusers' legacy `attention_head_dim` is the head count): at these widths
    four heads of 8 to 32 channels made attention 37% of a CPU training step; one head
    cuts a step by a third."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=1,
    )


def scheduler() -> DDIMScheduler:
    """Stable Diffusion's schedule unchanged (1000 steps, scaled_linear 0.00085..0.012), so the engine's
    step counts, guidance scales and inversion behave as with SD; at 16 x 16 it trains well as is."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def segmenter() -> CLIPSegForImageSegmentation:
    return CLIPSegForImageSegmentation(CLIPSegConfig(
        text_config=dict(hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
                         num_attention_heads=4, **CLIP_TOKENS),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=4, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=3, num_attention_heads=4),
        projection_dim=32, extract_layers=[0, 1, 2], reduce_dim=32, decoder_num_attention_heads=4,
        decoder_intermediate_size=128,
    ))


def segmenter_processor() -> CLIPSegProcessor:
    images = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **HALF)
    return CLIPSegProcessor(image_processor=images, tokenizer=clip_tokenizer())


def caption_words() -> list[str]:
    """Every word a caption can hold, and BLIP's special tokens ([DEC] starts a caption, as in BLIP)."""
    words = {"a", "an", "and", "of", "on", "with", "dot", "striped", "outline", "drawing", "background", "shape"}
    words |= set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(TONES)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + sorted(words)


def caption_tokenizer() -> BertTokenizerFast:
    """[DEC] is a special token, as in BLIP's hub processors, so decoding with skip_special_tokens drops it."""
    vocab = {word: i for i, word in enumerate(caption_words())}
    return BertTokenizerFast(vocab=vocab, model_max_length=32, additional_special_tokens=["[DEC]"])


def captioner_processor() -> BlipProcessor:
    images = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **HALF)
    return BlipProcessor(image_processor=images, tokenizer=caption_tokenizer())


def captioner() -> BlipForConditionalGeneration:
    words = caption_words()
    return BlipForConditionalGeneration(BlipConfig(
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=4, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=3, num_attention_heads=4),
        text_config=dict(vocab_size=len(words), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, encoder_hidden_size=64, max_position_embeddings=32,
                         pad_token_id=words.index("[PAD]"), bos_token_id=words.index("[DEC]"),
                         sep_token_id=words.index("[SEP]"), eos_token_id=words.index("[SEP]")),
        projection_dim=64,
    ))


def text_tokenizer() -> CLIPTokenizer:
    return clip_tokenizer()
