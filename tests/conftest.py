"""Every test runs offline: no model hub, no telemetry, single-threaded for reproducible float order."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

# One thread per test process: tiny models gain nothing from more, and the machine's 2 cores are shared.
torch.set_num_threads(1)
