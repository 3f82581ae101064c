"""Co-Mod-GAN generator and conditional discriminator (pure PyTorch)."""
from models.comodgan import Generator
from models.discriminator import Discriminator

__all__ = ["Generator", "Discriminator"]
