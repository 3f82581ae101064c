"""`python train.py trainer=ddp` with 2 CPU processes (gloo): every pair is seen once per epoch, and the ranks'
weights stay equal (G's and D's gradients, taken in two backward passes, are all-reduced)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from test_distill_data import write_pair_shards

ROOT = Path(__file__).resolve().parents[1]


class RecordRank(pl.Callback):
    """Writes the keys of every training batch of this rank to `directory/keys-rank<r>.jsonl` (one line per step)
    and its trained parameters to `directory/weights-rank<r>.pt`."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.directory / f"keys-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "keys": batch["key"]}) + "\n")

    def on_train_end(self, trainer, pl_module):
        # parameters only: buffers such as w_avg are rank-local between DDP's broadcasts at each forward
        parameters = {name: p.detach() for name, p in pl_module.named_parameters()}
        torch.save(parameters, self.directory / f"weights-rank{trainer.global_rank}.pt")


def test_ddp_two_cpu_processes_see_each_pair_once_per_epoch_and_stay_equal(tmp_path):
    pairs = write_pair_shards(tmp_path / "gen", count=8, resolution=64)
    run = tmp_path / "run"
    run.mkdir()
    # 8 pairs, 2 ranks, 2 pairs per batch: an epoch is 2 steps; 4 steps are 2 epochs
    command = [sys.executable, "train.py", "experiment=smoke", f"data.path={pairs}", f"out_dir={run}",
               "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
               "data.batch_size=4", "data.thresholds={}", "data.holdout_fraction=0", f"data.val_path={pairs}",
               "distill.lpips_weight=0", "trainer.max_steps=4", "trainer.val_check_interval=2",
               "+callbacks.record._target_=test_distill_ddp.RecordRank", f"+callbacks.record.directory={run}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    steps = {rank: [json.loads(line) for line in open(run / f"keys-rank{rank}.jsonl")] for rank in (0, 1)}
    assert [s["step"] for s in steps[0]] == [s["step"] for s in steps[1]] == [0, 1, 2, 3]
    for epoch in range(2):
        keys = [key for rank in (0, 1) for s in steps[rank][2 * epoch: 2 * epoch + 2] for key in s["keys"]]
        assert sorted(keys) == [f"{i:09d}" for i in range(8)]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4

    weights = [torch.load(run / f"weights-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert any(name.startswith("D.") for name in weights[0])   # the adversarial loss is on
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), f"{name} differs between the ranks"
