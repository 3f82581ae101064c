"""The benchmarks' --smoke runs (in this process) and the measurements they rest on."""
import importlib
import json
import shlex
import tempfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

import distill.module
from bench import generate, latency, regularizer, shards, train
from bench.measure import count_flops, peak_memory
from bench.report import RESULTS, Report

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()  # smoke runs use one thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def smoke_tmp(tmp_path, monkeypatch):
    """The test's own folder as the system's temporary one, where a smoke run without --out writes its JSON."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def run_smoke(script, smoke_tmp, *options: str) -> dict:
    """`script --smoke`, without --out: a smoke's figures are no results, so its JSON must land in the temporary
    folder, and bench/results (committed results such as regularizer.json among them) must stay as it was."""
    before = results_listing()
    path = script.main(["--smoke", *options])
    assert path.is_relative_to(smoke_tmp) and path.name == f"{script.__name__.split('.')[-1]}.json", path
    assert results_listing() == before
    return json.loads(path.read_text())


def results_listing() -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in RESULTS.iterdir()}


def test_a_bench_run_writes_where_out_says_and_by_default_into_bench_results(smoke_tmp):
    out = smoke_tmp / "given" / "mine.json"
    assert regularizer.main(["--smoke", "--out", str(out)]) == out and json.loads(out.read_text())["tables"]
    # a full run's default (the path only: nothing is written before a row is added)
    assert Report("regularizer", None, torch.device("cpu"), {}).path == RESULTS / "regularizer.json"


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


PARITY_ATOL = 2e-5  # both editors' pair in the smoke's setting differ by 5e-6 (fp32 rounding over 2 + 2 steps)


def test_generate_smoke_gives_the_reference_pair_and_counts_the_same_unet_work(smoke_tmp):
    """With the compiled editor timed beside the eager one (backend "eager": dynamo's graph capture with eager
    kernels, so its pair is the eager editor's to the bit); its UNet work is counted without a hook in its graph."""
    result = run_smoke(generate, smoke_tmp, "--compile", "eager")
    (parity,) = result["tables"]["Same pair from both editors (batch 1)"]["rows"]
    assert parity["max abs edited diff"] < PARITY_ATOL
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


def test_generate_times_other_teachers_beside_pix2pix_zero_and_counts_their_unet_work(smoke_tmp):
    """--editor: every row's UNet evaluations are counted by a hook on the UNet, and equal what the teacher's loop
    must run at the smoke's 2 steps on a real input (1 sample per inversion step at guidance 1; 2 guidance halves
    per sampled row and step)."""
    result = run_smoke(generate, smoke_tmp, "--editor", "p2p", "word_swap", "sdedit", "pix2pix_zero:negative_prompt",
                       "p2p:null_text")
    rows = result["tables"]["Teachers: seconds per pair"]["rows"]
    assert [(row["editor"], row.get("batch")) for row in rows] == [
        ("pix2pix_zero", 1), ("pix2pix_zero", 2), ("p2p", 1), ("p2p", 2), ("word_swap", 1), ("word_swap", 2),
        ("sdedit", 1), ("sdedit", 2), ("pix2pix_zero:negative_prompt", None), ("p2p:null_text", 1), ("p2p:null_text", 2)]
    *rows, null_text = rows[:-1]  # batch 1 of null-text's: below
    evals = {row["editor"]: row["UNet evals/pair"] for row in rows if "batch" in row}
    assert evals == {"pix2pix_zero": 2 + 2 * (1 + 2 * 2),  # reference once, guidance and guided edit with 2 halves
                     "p2p": 2 + 2 * 2 * 2,  # source and target rows
                     "word_swap": 2 + 2 * 2,  # the target row alone: a real input's source row is the image
                     "sdedit": int(0.8 * 2) * 2}  # strength 0.8 of 2 steps
    backwards = {row["editor"]: row["UNet backwards/pair"] for row in rows if "batch" in row}
    assert backwards == {"pix2pix_zero": 2 * 2, "p2p": 0, "word_swap": 0, "sdedit": 0}  # the guidance step, per half
    assert all(row.get("inversion s/pair") is None for row in rows)  # DDIM inversion does not time itself
    for row in rows[:8]:
        baseline = next(r for r in rows if r["editor"] == "pix2pix_zero" and r["batch"] == row["batch"])
        assert row["x pix2pix-zero"] == pytest.approx(row["s/pair"] / baseline["s/pair"])
    assert "negative prompt" in rows[-1]["note"]  # a teacher that refuses an inversion says why, in its row
    # null-text's inversion times itself: the row splits its seconds; its inner optimisation runs a backward per step
    assert null_text["inversion s/pair"] + null_text["edit s/pair"] == pytest.approx(null_text["s/pair"])
    assert 0 < null_text["edit s/pair"] < null_text["inversion s/pair"]
    assert null_text["UNet backwards/pair"] >= 2  # at least one inner step at each of the 2 timesteps


def test_the_smokes_parity_check_fails_without_the_guidance_or_with_the_papers_update():
    """The parity above has power: in the smoke's setting (sharpened cross-attention, real input) our editor
    without cross-attention guidance, or with the paper's shared update instead of the official code's, is
    measured 0.21 and 0.14 away from the reference loop's pair, 10^4 times the tolerance."""
    setup = generate.build_setup("tiny", "real", 1, 2, torch.device("cpu"), generate.SMOKE_SHARPENING)
    _, reference = setup.run_reference(setup.reference(), setup.ours(), 0)
    for wrong in ({"xa_guidance_real": 0.0}, {"xa_update": "shared"}):
        distance = (setup.run_ours(setup.ours(**wrong), 0, 1) - reference).abs().max().item()
        assert distance > 1000 * PARITY_ATOL, (wrong, distance)


class Doubling(torch.nn.Module):
    """A stand-in generator, scriptable, with the resolution attribute the latency benchmark reads."""

    def __init__(self) -> None:
        super().__init__()
        self.resolution = 8
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return 2 * self.conv(image)


def test_latency_smoke_times_eager_and_torchscript_on_the_same_images(smoke_tmp, monkeypatch):
    rows = run_smoke(latency, smoke_tmp)["tables"]["Generator latency"]["rows"]
    assert [(row["batch"], row["mode"]) for row in rows] == [(1, "eager"), (1, "torchscript"), (2, "eager"), (2, "torchscript")]
    for row in rows:
        assert row["max abs diff vs eager"] < 1e-5
        assert row["p95 ms"] >= row["median ms"] > 0
        assert row["images/s"] == pytest.approx(1e3 * row["batch"] / row["median ms"])
    # the difference column sees a mode that computes other images (here off by 1e-3): it would fail the check above
    monkeypatch.setattr(latency, "compiled_modes", lambda device, dtype: {
        "eager": lambda g: g, "torchscript": torch.jit.script, "off": lambda g: lambda image: g(image) + 1e-3})
    report = Report("control", smoke_tmp / "control.json", torch.device("cpu"), {latency.LATENCY: ["mode"]})
    latency.bench_generator(Doubling(), "doubling", torch.device("cpu"), "fp32", [2], None, False, 0, 1, report, False)
    differences = {row["mode"]: row["max abs diff vs eager"] for row in report.rows(latency.LATENCY)}
    assert differences["eager"] == 0 and differences["torchscript"] < 1e-6
    assert differences["off"] == pytest.approx(1e-3, rel=1e-3)


def test_train_smoke_reports_step_and_loader_throughput(smoke_tmp):
    (row,) = run_smoke(train, smoke_tmp)["tables"]["Distillation throughput"]["rows"]
    assert (row["preset"], row["batch"], row["adversarial"]) == ("small", 4, True)
    assert row["train images/s"] > 0 and row["loader images/s per worker"] > 0
    assert row["bound by"] == ("data" if row["workers needed"] > row["workers configured"] else "compute")


class R1Watch(pl.Callback):
    """Per training step, whether the module really took the lazy R1 penalty (the penalty function is spied)."""

    def __init__(self) -> None:
        self.steps: list[bool] = []

    def on_train_batch_start(self, *args) -> None:
        self.steps.append(False)

    def spy(self, penalty):
        def spied(*args, **kwargs):
            self.steps[-1] = True
            return penalty(*args, **kwargs)
        return spied


def test_the_step_rate_leaves_out_the_steps_the_module_took_r1_on(tmp_path, monkeypatch):
    """The timer flags R1 steps by the module's rule, not by seeing one: it must flag exactly the timed steps on
    which the module took R1 (every 2nd here; the smoke's 2 timed steps at interval 16 have none), and the median
    must leave those out while the rate incl. R1 keeps them."""
    cfg = train.train_config("small", tmp_path, ["data.batch_size=2", "trainer=cpu", "trainer.precision=32-true",
                                                 "distill.r1_interval=2", "distill.lpips_weight=0"])
    watch = R1Watch()
    monkeypatch.setattr(distill.module, "r1_penalty", watch.spy(distill.module.r1_penalty))
    timer = train.timed_fit(cfg, warmup=1, steps=4, callbacks=[watch])
    assert len(timer.times) == 4 and watch.steps == [True, False, True, False, True]
    assert timer.r1_steps == watch.steps[1:]
    timer.times = [1.0, 5.0, 1.2, 5.0]  # R1 steps slow: the median is 1.1 s over the others, the mean 3.05 s over all
    assert train.step_rates(timer, 2) == pytest.approx(
        {"median step s": 1.1, "train images/s": 2 / 1.1, "train images/s incl. R1": 2 / 3.05})


def test_regularizer_smoke_gives_autograds_noise_with_fewer_ops(smoke_tmp):
    rows = run_smoke(regularizer, smoke_tmp)["tables"][regularizer.TABLE]["rows"]
    assert [(row["regularizer"], row["batch"]) for row in rows] == [
        ("autograd (reference)", 1), ("ours", 1), ("autograd (reference)", 2), ("ours", 2)]
    for reference, ours in zip(rows[::2], rows[1::2]):
        assert ours["max abs diff"] < 1e-5 and ours["syncs/call"] is None  # no sync count on a CPU
        # written-out gradients: no autograd graph, backward ops or loss bookkeeping (measured 829 vs 1874 ops)
        assert ours["ops/call"] < 0.5 * reference["ops/call"], (ours, reference)


def test_shards_smoke_writes_the_same_shard_inline_and_on_encoder_threads(smoke_tmp):
    rows = run_smoke(shards, smoke_tmp)["tables"][shards.TABLE]["rows"]
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
