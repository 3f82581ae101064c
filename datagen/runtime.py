"""What every stage needs before any model library loads: the device and precision policy, and the one
readable error for a model that is not on this machine. Kept free of diffusers/transformers imports so
light entry points (`python -m filters`, evaluate, translate helpers) start fast."""
from __future__ import annotations

import torch


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded; the message says which and what to use offline instead."""


def model_unavailable(what: str, source: str, error: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"Cannot load {what} '{source}' ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
        "Download it once with network access (or set HF_HOME to a cache that has it), point to a local "
        "copy with `model.path=/local/folder`, or run offline with `model=toy` (trained toy world) or "
        "`model=tiny` (random weights)."
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU; on GPU bf16 where supported (it never overflows in the VAE), else fp16."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
