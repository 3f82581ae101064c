"""The benchmarks' --smoke runs (in this process) and the measurements they rest on."""
import importlib
import json
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import generate, latency, regularizer, shards, train
from bench.measure import count_flops, peak_memory
from bench.report import Report

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()  # smoke runs use one thread
    yield
    torch.set_num_threads(threads)


def run_smoke(script, tmp_path, *options: str) -> dict:
    path = script.main(["--smoke", "--out", str(tmp_path / "result.json"), *options])
    return json.loads(path.read_text())


def test_flop_count_is_exact_for_matmul_and_cpu_attention_forward_and_backward():
    x = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(32, 16, requires_grad=True)
    # forward x @ w^T, backward grad_x and grad_w: three (8 x 16 x 32) matmuls of 2 FLOPs per multiply-add
    assert count_flops(lambda: F.linear(x, weight).sum().backward()) == 3 * 2 * 8 * 16 * 32
    q = torch.randn(2, 4, 64, 8)  # batch, heads, tokens, head dim
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * (2 * 2 * 4 * 64 * 64 * 8)


def test_peak_memory_sees_a_temporary_allocation():
    with peak_memory(torch.device("cpu")) as baseline:
        pass
    with peak_memory(torch.device("cpu")) as peak:
        block = torch.ones(2**26)  # 256 MiB, freed before the block ends
        del block
    assert peak["peak_gib"] - baseline["peak_gib"] > 0.2


def test_generate_smoke_gives_the_reference_pair_and_counts_the_same_unet_work(tmp_path):
    """With the compiled editor timed beside the eager one (backend "eager": dynamo's graph capture with eager
    kernels, so its pair is the eager editor's to the bit); its UNet work is counted without a hook in its graph."""
    result = run_smoke(generate, tmp_path, "--compile", "eager")
    (parity,) = result["tables"]["Same pair from both editors (batch 1)"]["rows"]
    assert parity["max abs edited diff"] < 1e-3
    (compiled,) = result["tables"]["Compiled UNet against eager (our editor, largest batch)"]["rows"]
    assert (compiled["batch"], compiled["backend"], compiled["max abs edited diff"]) == (2, "eager", 0)
    rows = result["tables"]["Seconds per pair"]["rows"]
    reference = next(row for row in rows if row["editor"] == "reference")
    ours = [row for row in rows if row["editor"] != "reference"]
    assert [(row["editor"], row["batch"]) for row in ours] == [("ours", 1), ("ours", 2), ("ours compiled", 2)]
    # 2 inversion steps (1 sample each) + 2 edit steps x (reference, guidance, guided) x 2 guidance halves, where
    # ours runs the reference forward once: a real input's caption is also its negative prompt
    assert reference["UNet evals/pair"] == 2 + 2 * 3 * 2
    assert {row["UNet evals/pair"] for row in ours} == {2 + 2 * (1 + 2 * 2)}
    # the reference also materialises self-attention and takes the cross-attention weights' gradients
    assert reference["TFLOP/pair"] > ours[0]["TFLOP/pair"]
    for row in ours:
        assert row["ref/ours"] == pytest.approx(reference["s/pair"] / row["s/pair"])
        assert row["h per 15k pairs @100/100"] > row["s/pair"] * 15_000 / 3600  # 100 steps cost more than 2


def test_latency_smoke_times_eager_and_torchscript_on_the_same_images(tmp_path):
    rows = run_smoke(latency, tmp_path)["tables"]["Generator latency"]["rows"]
    assert [(row["batch"], row["mode"]) for row in rows] == [(1, "eager"), (1, "torchscript"), (2, "eager"), (2, "torchscript")]
    for row in rows:
        assert row["max abs diff vs eager"] < 1e-5
        assert row["p95 ms"] >= row["median ms"] > 0
        assert row["images/s"] == pytest.approx(1e3 * row["batch"] / row["median ms"])


def test_train_smoke_compares_step_and_loader_throughput(tmp_path):
    (row,) = run_smoke(train, tmp_path)["tables"]["Distillation throughput"]["rows"]
    assert row["preset"] == "small" and row["batch"] == 4
    assert row["train images/s"] == pytest.approx(4 / row["median step s"])
    assert row["workers needed"] == pytest.approx(row["train images/s"] / row["loader images/s per worker"])
    assert row["bound by"] == ("data" if row["workers needed"] > row["workers configured"] else "compute")


def test_regularizer_smoke_gives_autograds_noise_with_fewer_ops(tmp_path):
    rows = run_smoke(regularizer, tmp_path)["tables"][regularizer.TABLE]["rows"]
    assert [(row["regularizer"], row["batch"]) for row in rows] == [
        ("autograd (reference)", 1), ("ours", 1), ("autograd (reference)", 2), ("ours", 2)]
    for reference, ours in zip(rows[::2], rows[1::2]):
        assert ours["max abs diff"] < 1e-5 and ours["syncs/call"] is None  # no sync count on a CPU
        # written-out gradients: no autograd graph, backward ops or loss bookkeeping (measured 829 vs 1874 ops)
        assert ours["ops/call"] < 0.5 * reference["ops/call"], (ours, reference)


def test_shards_smoke_writes_the_same_shard_inline_and_on_encoder_threads(tmp_path):
    rows = run_smoke(shards, tmp_path)["tables"][shards.TABLE]["rows"]
    assert [row["writer"] for row in rows] == ["inline", "2 encoder threads"]
    assert all(row["same bytes"] for row in rows)


def test_report_keeps_each_finished_setting_before_the_run_ends(tmp_path, capsys):
    path = tmp_path / "partial.json"
    report = Report("partial", path, torch.device("cpu"), {"Times": ["setting", "ms"], "Kernels": ["kernel"]})
    report.add("Times", {"setting": "a", "ms": 1.5})
    written = json.loads(path.read_text())  # what a run killed here (a device call's time limit) leaves
    assert written["partial"] and written["tables"]["Times"]["rows"] == [{"setting": "a", "ms": 1.5}]
    assert capsys.readouterr().out.strip() == "| a | 1.5 |"
    report.add("Times", {"setting": "b", "ms": 2.0})
    report.finish()
    final = json.loads(path.read_text())
    assert not final["partial"] and [row["setting"] for row in final["tables"]["Times"]["rows"]] == ["a", "b"]
    assert "Kernels" not in capsys.readouterr().out  # empty tables are not printed


def gpu_commands() -> list[tuple[str, list[str]]]:
    """(module, arguments) of every `run SECONDS -m MODULE ...` line of bench/gpu.sh, continuations joined."""
    script = (REPO / "bench" / "gpu.sh").read_text().replace("\\\n", " ")
    commands = []
    for line in script.splitlines():
        if line.strip().startswith("run "):
            words = shlex.split(line.replace('"$out', '"/tmp/out'))
            assert words[2] == "-m", line
            commands.append((words[3], words[4:]))
    return commands


def test_every_gpu_sh_command_parses_and_names_presets_that_exist():
    """A lent GPU comes rarely and for minutes: a typo in bench/gpu.sh must fail here, not there."""
    commands = gpu_commands()
    assert {module for module, _ in commands} == {"bench.generate", "bench.latency", "bench.regularizer", "bench.train",
                                                  "toyworld.train"}
    for module, argv in commands:
        args = importlib.import_module(module).arguments().parse_args(argv)  # argparse exits on a bad option
        for preset in getattr(args, "presets", None) or []:
            assert (REPO / "conf" / "generator" / f"{preset}.yaml").is_file(), (module, preset)
