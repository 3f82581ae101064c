"""A generation run written as datagen writes it (random pairs with the scores given): what filters and evaluate read."""
from pathlib import Path

import torch
from omegaconf import OmegaConf

from datagen.shards import ShardWriter

CONF = Path(__file__).parents[1] / "conf"


def write_run(run_dir: Path, scores: list[dict] | None, per_shard: int = 3, resolution: int = 16,
              in_progress: bool = False) -> list[str]:
    """config.yaml (cat2dog, tiny scorers) and two finished shards, plus a third still being written if `in_progress`.
    Sample i gets scores[i % len(scores)] (none if `scores` is None). Returns every key written."""
    run_dir.mkdir()
    model = {"name": "tiny", "resolution": resolution, "scorers": OmegaConf.load(CONF / "scorers" / "tiny.yaml")}
    OmegaConf.save(OmegaConf.create({"task": OmegaConf.load(CONF / "task" / "cat2dog.yaml"), "model": model}),
                   run_dir / "config.yaml")
    generator = torch.Generator().manual_seed(0)
    keys = []
    for shard in range(3 if in_progress else 2):
        writer = ShardWriter(run_dir, shard)
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            meta = {"key": f"{i:09d}", "task": "cat2dog", "source_word": "cat", "target_word": "dog", "seed": i,
                    "caption": "a photo of a cat"}
            if scores is not None:
                meta["scores"] = scores[i % len(scores)]
            images = torch.rand(2, 3, resolution, resolution, generator=generator)
            writer.write(meta["key"], images[0], images[1], meta)
            keys.append(meta["key"])
        if shard < 2:
            writer.close()
    return keys
