"""Every test runs offline: no model hub, no telemetry, single-threaded for reproducible float order."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread per test process: tiny models gain nothing from more, and the machine's 2 cores are shared.
torch.set_num_threads(1)


@pytest.fixture
def finals(monkeypatch) -> list[torch.Tensor]:
    """The final latents of the Prompt-to-Prompt family's sampling runs, in order: rows (input, member)."""
    import datagen.editors.p2p as p2p
    from datagen.editors.base import denoise

    kept = []

    def denoise_kept(*args, **kwargs):
        kept.append(denoise(*args, **kwargs))
        return kept[-1]

    monkeypatch.setattr(p2p, "denoise", denoise_kept)
    return kept
