"""`python train.py trainer=ddp` with 2 CPU processes (gloo): every pair is seen once per epoch, the ranks' weights
stay equal (G's and D's gradients, taken in two backward passes, are all-reduced), and 2 ranks train what one
process does on the same global batch."""
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
    and its parameters before and after training to `directory/weights-{start,end}-rank<r>.pt`."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.directory / f"keys-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "keys": batch["key"]}) + "\n")

    def on_train_start(self, trainer, pl_module):
        self.save(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module):
        self.save(trainer, pl_module, "end")

    def save(self, trainer, pl_module, when):
        # parameters only: buffers such as w_avg are rank-local between DDP's broadcasts at each forward
        parameters = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        torch.save(parameters, self.directory / f"weights-{when}-rank{trainer.global_rank}.pt")


class SameDrawsOnEveryRank(pl.Callback):
    """Takes out the randomness that is drawn per rank by design, (seed, step, rank), so that 2 ranks and 1 process
    can compute the same steps: G's z comes from a fixed projection of each input instead of a draw, and the noise
    inputs stay off (their strengths, which start at 0, frozen). Set up before DDP wraps the module."""

    def setup(self, trainer, pl_module, stage):
        G = pl_module.G
        for name, parameter in G.named_parameters():
            if name.endswith("noise_strength"):
                parameter.requires_grad_(False)
        pixels = 3 * G.resolution**2
        projection = torch.randn(pixels, G.z_dim, generator=torch.Generator().manual_seed(0)) / pixels**0.5
        forward = G.forward
        G.forward = lambda image, z=None: forward(image, image.flatten(1) @ projection)


def train(pairs: Path, run: Path, devices: int) -> None:
    """4 steps of the global batch 4 on `devices` CPU processes, recorded by RecordRank into `run`."""
    run.mkdir()
    # MinibatchStd groups of 2: sample n of a batch of 4 is grouped with n + 2, as each rank's batch of 2 is.
    # Adam's eps at 1 makes its step proportional to a small gradient: at 1e-8 a gradient near 0 steps by +-lr
    # whatever its sign, and that sign is the rounding of two ways to sum it (measured: 5e-4 apart after 4 steps);
    # lr 0.01 then moves every tensor of G and D (by up to 0.016) without the GAN's dynamics amplifying rounding.
    command = [sys.executable, "train.py", "experiment=smoke", f"data.path={pairs}", f"out_dir={run}",
               "trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={devices}", "trainer.precision=32-true",
               "data.batch_size=4", "data.shuffle_buffer=1", "data.thresholds={}", "data.holdout_fraction=0",
               f"data.val_path={pairs}", "distill.lpips_weight=0", "distill.lr=0.01", "distill.eps=1", "distill.generator.dropout=0",
               "distill.discriminator.mbstd_group=2", "trainer.max_steps=4", "trainer.val_check_interval=2",
               "+callbacks.record._target_=test_distill_ddp.RecordRank", f"+callbacks.record.directory={run}",
               "+callbacks.same_draws._target_=test_distill_ddp.SameDrawsOnEveryRank"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_two_cpu_processes_see_each_pair_once_per_epoch_and_train_as_one_process(tmp_path):
    pairs = write_pair_shards(tmp_path / "gen", count=8, resolution=64)
    train(pairs, tmp_path / "ddp", devices=2)
    train(pairs, tmp_path / "one", devices=1)
    run = tmp_path / "ddp"

    # 8 pairs, global batch 4 = 2 ranks x 2 pairs: an epoch is 2 steps; 4 steps are 2 epochs
    steps = {rank: [json.loads(line) for line in open(run / f"keys-rank{rank}.jsonl")] for rank in (0, 1)}
    assert [s["step"] for s in steps[0]] == [s["step"] for s in steps[1]] == [0, 1, 2, 3]
    assert all(len(s["keys"]) == 2 for rank in (0, 1) for s in steps[rank])
    for epoch in range(2):
        keys = [key for rank in (0, 1) for s in steps[rank][2 * epoch: 2 * epoch + 2] for key in s["keys"]]
        assert sorted(keys) == [f"{i:09d}" for i in range(8)]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4

    # the one process's global batches hold the same pairs as the ranks' together
    alone = [json.loads(line) for line in open(tmp_path / "one" / "keys-rank0.jsonl")]
    assert [sorted(s["keys"]) for s in alone] == [sorted(a["keys"] + b["keys"]) for a, b in zip(steps[0], steps[1])]

    start, *ranks = (torch.load(run / f"weights-{when}-rank{rank}.pt", weights_only=True)
                     for when, rank in (("start", 0), ("end", 0), ("end", 1)))
    one = torch.load(tmp_path / "one" / "weights-end-rank0.pt", weights_only=True)
    atol = 1e-5  # 2 ranks against 1 process, measured 5e-7: the rounding of two ways to average the gradients
    for network in ("G.", "D."):  # D: the adversarial loss is on
        moves = {name: (ranks[0][name] - start[name]).abs().max() for name in start
                 if name.startswith(network) and not name.endswith("noise_strength")}
        assert moves and all(moves.values()), [name for name, move in moves.items() if not move]  # all of them moved
        assert max(moves.values()) > 100 * atol
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"{name} differs between the ranks"
        torch.testing.assert_close(value, one[name], atol=atol, rtol=0, msg=f"{name}: 2 ranks differ from 1 process")
