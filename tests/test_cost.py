"""Cost per stage (pipeline/cost.py, pipeline/cost_check.py): the Meter's fields on a real busy loop with codecarbon,
the intensity key over the country's figure, a failing or missing codecarbon recorded instead of stopping a stage,
the runner's cost table and cost.md, and --check's projection against the same numbers worked out by hand."""

import json
import os
import time
from types import SimpleNamespace

import pytest

from conftest import REPO, run_cli, tiny_recipe
from pipeline import check, cluster, cost, cost_check, memory
from pipeline.cli import PipelineError
from pipeline.recipe import load_recipe

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FIELDS = ("wall_s", "cpu_s", "gpu_hours", "peak_rss_mb", "parameters", "energy_kwh", "carbon_intensity_g_per_kwh",
          "carbon_intensity_source", "co2e_kg")


class FakeTracker:
    """Stands in for codecarbon's tracker: what Meter reads of it, and failures on demand."""

    def __init__(self, kwh=0.002, fail_at=None):
        self.kwh, self.fail_at, self.stopped = kwh, fail_at, False
        self._hardware = [type("CPU", (), {"_mode": "intel_rapl"})(), type("RAM", (), {})()]
        self._tracking_mode = "process"

    def start(self):
        if self.fail_at == "start":
            raise RuntimeError("no sensors here")

    def stop(self):
        if self.fail_at == "stop":
            raise OSError("counter vanished")
        self.stopped = True
        self.final_emissions_data = SimpleNamespace(energy_consumed=self.kwh, cpu_energy=self.kwh * 0.75,
                                                    gpu_energy=0.0, ram_energy=self.kwh * 0.25, duration=1.5)


def busy(seconds: float) -> None:
    end = time.time() + seconds
    x = 0
    while time.time() < end:
        x += 1


def test_meter_records_every_field_with_codecarbon_on_a_busy_loop(capfd):
    started = time.time()
    meter = cost.Meter("USA")
    meter.start_energy()
    # codecarbon starts in a background thread; on a loaded CI machine that took longer than the loop (tracked 0.0 s),
    # so wait for it: this test is about the fields of a tracked span, not about how fast codecarbon starts
    meter._thread.join(cost.START_WAIT_S)
    busy(4)
    block = meter.stop()
    elapsed = time.time() - started
    assert all(k in block for k in FIELDS), block
    assert block["wall_s"] == pytest.approx(elapsed, abs=0.5) and block["cpu_s"] >= 2 and block["peak_rss_mb"] > 10
    assert block["gpu_hours"] == 0 and block["gpus"] == 0
    assert block["energy_kwh"] > 0, block.get("energy_error")
    parts = block["energy_cpu_kwh"] + block["energy_gpu_kwh"] + block["energy_ram_kwh"]
    assert parts == pytest.approx(block["energy_kwh"], rel=1e-6)
    assert block["energy_method"].startswith("codecarbon ") and "process mode" in block["energy_method"]
    assert isinstance(block["energy_estimate"], bool) and 3 <= block["energy_tracked_s"] <= block["wall_s"] + 1
    assert block["carbon_intensity_source"].startswith("codecarbon USA")
    assert block["co2e_kg"] == pytest.approx(block["energy_kwh"] * block["carbon_intensity_g_per_kwh"] / 1000)
    out, err = capfd.readouterr()
    assert "codecarbon" not in out + err  # its WARNING/INFO lines are silenced


def test_intensity_key_wins_over_the_country_figure():
    fra, source = cost.grid_intensity("FRA", None)
    assert source.startswith("codecarbon FRA") and 0 < fra < 1000
    usa, _ = cost.grid_intensity("usa", None)
    assert usa != fra
    assert cost.grid_intensity("FRA", 123.0) == (123.0, cost.RECIPE_INTENSITY)
    world, why = cost.grid_intensity("XYZ", None)
    assert world > 0 and why == "codecarbon world average (no data for XYZ)"

    seen = {}

    def factory(country, intensity):
        seen.update(country=country, intensity=intensity)
        return FakeTracker(kwh=0.002)

    meter = cost.Meter("fra", intensity=123.0, tracker_factory=factory)
    meter.start_energy()
    block = meter.stop()
    assert seen == {"country": "FRA", "intensity": 123.0}  # forced on codecarbon too: it asks no grid service
    assert block["carbon_intensity_g_per_kwh"] == 123.0 and block["carbon_intensity_source"] == cost.RECIPE_INTENSITY
    assert block["co2e_kg"] == pytest.approx(0.002 * 123.0 / 1000)
    assert block["energy_method"].endswith("cpu: RAPL counters; ram: estimate (codecarbon's RAM model)")
    assert block["energy_estimate"] is False and block["energy_tracked_s"] == 1.5


@pytest.mark.parametrize("fail_at, expected", [("start", "codecarbon did not start (RuntimeError: no sensors here)"),
                                               ("stop", "codecarbon failed at the stop (OSError: counter vanished)"),
                                               ("factory", "codecarbon did not start (ImportError: gone)")])
def test_a_failing_tracker_leaves_an_energy_error_and_the_rest(fail_at, expected):
    def factory(country, intensity):
        if fail_at == "factory":
            raise ImportError("gone")
        return FakeTracker(fail_at=fail_at)

    meter = cost.Meter(tracker_factory=factory)
    meter.start_energy()
    block = meter.stop()
    assert block["energy_error"] == expected and block["energy_kwh"] is None and block["co2e_kg"] is None
    assert block["wall_s"] >= 0 and block["peak_rss_mb"] > 0 and block["carbon_intensity_g_per_kwh"] > 0


def test_a_tracker_abandoned_or_still_starting_is_stopped_without_waiting(monkeypatch):
    late = FakeTracker()

    def slow(country, intensity):
        time.sleep(1.5)
        return late

    monkeypatch.setattr(cost, "START_WAIT_S", 0.1)
    meter = cost.Meter(tracker_factory=slow)
    meter.start_energy()
    assert meter.stop()["energy_error"] == "codecarbon did not start within 0.1 s"
    time.sleep(2)
    assert late.stopped  # it stopped itself once it had started

    early = FakeTracker()
    meter = cost.Meter(tracker_factory=lambda c, i: early)
    meter.start_energy()
    time.sleep(0.5)
    meter.abandon()
    assert early.stopped


def test_a_resumed_stage_costs_the_sum_of_its_attempts():
    """An attempt that stops early records wall, CPU time and energy so far; the attempt that finishes adds them
    to its own, lists each, and leaves energy out of the sum when one attempt has none."""
    first = cost.Meter("USA", intensity=200.0, tracker_factory=lambda c, i: FakeTracker(kwh=0.001))
    first.start_energy()
    busy(0.5)
    stopped = first.attempt()
    assert stopped["wall_s"] >= 0.5 and stopped["cpu_s"] > 0 and stopped["energy_kwh"] == 0.001

    last = cost.Meter("USA", intensity=200.0, tracker_factory=lambda c, i: FakeTracker(kwh=0.003))
    last.start_energy()
    busy(0.3)
    alone = dict(last.stop())
    last = cost.Meter("USA", intensity=200.0, tracker_factory=lambda c, i: FakeTracker(kwh=0.003))
    last.start_energy()
    block = last.stop(earlier=[stopped])
    assert [a["energy_kwh"] for a in block["attempts"]] == [0.001, 0.003]
    assert block["wall_s"] == pytest.approx(stopped["wall_s"] + block["attempts"][1]["wall_s"], abs=0.11)
    assert block["energy_kwh"] == pytest.approx(0.004) and block["co2e_kg"] == pytest.approx(0.004 * 200 / 1000)
    assert block["energy_cpu_kwh"] == pytest.approx(0.003) and "attempts" not in alone

    no_energy = {**stopped, "energy_kwh": None, "energy_error": "codecarbon did not stop within 10 s"}
    block = cost.with_attempts(dict(alone), [no_energy])
    assert block["energy_kwh"] is None and block["co2e_kg"] is None
    assert block["energy_error"] == "1 of 2 attempts have no energy figure"
    assert block["cpu_s"] == pytest.approx(stopped["cpu_s"] + alone["cpu_s"], abs=0.11)


def test_a_stage_without_codecarbon_finishes_and_records_why(tmp_path):
    """A codecarbon that cannot be imported (shadowed here by a broken package): the stage finishes, its manifest
    has wall/CPU/memory and energy_error, and nothing about it reaches stderr."""
    broken = tmp_path / "broken" / "codecarbon"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('simulated: codecarbon is broken')\n")
    recipe = tiny_recipe(tmp_path, sft=None, pretrain={"max_steps": 2})
    path = os.pathsep.join(p for p in (str(broken.parent), os.environ.get("PYTHONPATH", "")) if p)
    proc = run_cli(["pipeline/pretrain.py", recipe], cwd=tmp_path, env={**ONE_THREAD, "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    block = json.loads((tmp_path / "runs/tiny/pretrain/manifest.json").read_text())["cost"]
    assert block["energy_error"] == "codecarbon did not start (ImportError: simulated: codecarbon is broken)"
    assert block["co2e_kg"] is None and block["carbon_intensity_source"].startswith("unknown (ImportError")
    assert block["wall_s"] > 0 and block["cpu_s"] > 0 and block["peak_rss_mb"] > 100
    assert "Traceback" not in proc.stderr and "codecarbon" not in proc.stderr
    assert "[pretrain] cost: " in proc.stdout and "energy not recorded" in proc.stdout


def test_carbon_keys_are_validated_when_the_recipe_loads(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path), ["run.carbon_intensity_g_per_kwh=56", "run.carbon_country=fra"])
    assert recipe.run.carbon_intensity_g_per_kwh == 56.0 and recipe.run.carbon_country == "fra"
    assert load_recipe(tiny_recipe(tmp_path)).run.carbon_country == "USA"
    for override, text in (("run.carbon_country=US", "run.carbon_country must be a 3-letter ISO 3166"),
                           ("run.carbon_intensity_g_per_kwh=-1", "run.carbon_intensity_g_per_kwh must be 0 or more"),
                           ("run.carbon_intensity_g_per_kwh=lots", "must be float or null")):
        with pytest.raises(PipelineError, match=text) as err:
            load_recipe(tiny_recipe(tmp_path), [override])
        assert "\n" not in str(err.value)


def test_cost_table_formats_rows_and_totals():
    manifests = {
        "pretrain": {"cost": {"parameters": 722_000, "wall_s": 2389.4, "cpu_s": 4000.0, "gpu_hours": 0.0,
                              "peak_rss_mb": 900.0, "energy_kwh": 0.02, "carbon_intensity_g_per_kwh": 400.0,
                              "carbon_intensity_source": "codecarbon USA 2023", "co2e_kg": 0.008,
                              "energy_method": "codecarbon 3.3.2 process mode; cpu: estimate from TDP x CPU load"}},
        "sft": {"cost": {"parameters": 7_240_000_000, "wall_s": 7380.0, "cpu_s": 100.0, "gpu_hours": 16.4,
                         "peak_rss_mb": 30000.0, "energy_kwh": 0.06, "carbon_intensity_g_per_kwh": 100.0,
                         "carbon_intensity_source": cost.RECIPE_INTENSITY, "co2e_kg": 0.006,
                         "energy_method": "codecarbon 3.3.2 process mode; cpu: RAPL counters; gpu: NVML counters"}},
        "eval": None,
    }
    lines = cost.run_report(["pretrain", "sft", "eval"], manifests, "runs/x")
    table = lines[lines.index("| stage | parameters | wall | energy kWh | intensity gCO2e/kWh | CO2e kg |"):]
    assert table[1:5] == ["|---|---|---|---|---|---|",
                          "| pretrain | 722K | 39m 49s | 0.02 | 400 | 0.008 |",
                          "| sft | 7.24B | 2h 03m | 0.06 | 100 | 0.006 |",
                          "| **total** | | 2h 42m | 0.08 | 175 | 0.014 |"]  # 0.014 kg / 0.08 kWh = 175 g/kWh
    assert "- eval: not run yet (not in the table)" in lines
    assert any(line.startswith("- sft: CPU 1m 40s, GPU 16.4 h, peak RSS 30000 MiB; intensity from recipe")
               for line in lines)
    # a stage without energy: the total says so rather than adding up part of it
    manifests["sft"]["cost"].update(energy_kwh=None, co2e_kg=None, energy_method=None, energy_error="x")
    total = cost.cost_table([{"stage": s, **manifests[s]["cost"]} for s in ("pretrain", "sft")])[-1]
    assert total == "| **total** | | 2h 42m | - | - | - |"
    manifests["pretrain"]["cost"]["attempts"] = [{"wall_s": 1000.0}, {"wall_s": 1389.4}]
    assert any(line.startswith("- pretrain: CPU 1h 06m, GPU 0 h, peak RSS 900 MiB over 2 attempts (it was stopped")
               for line in cost.run_report(["pretrain"], manifests, "runs/x"))


def test_runner_prints_the_cost_table_and_writes_cost_md(tiny_run):
    work, _, proc = tiny_run
    run_dir = work / "runs" / "tiny"
    text = (run_dir / "cost.md").read_text()
    assert "cost (README: Cost per stage):" in proc.stdout
    assert f"written to {run_dir.relative_to(work)}/cost.md" in proc.stdout
    blocks = {}
    for stage in ("pretrain", "sft"):
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        blocks[stage] = block = manifest["cost"]
        assert block["energy_kwh"] > 0 and block["parameters_of"] == "model" and block["gpu_hours"] == 0
        assert block["wall_s"] >= manifest["wall_time_s"]  # the whole process, imports included
        row = f"| {stage} | {cost.human_count(block['parameters'])} | {cost.human_time(block['wall_s'])} | "
        assert row in text and row in proc.stdout
    metrics = json.loads((run_dir / "pretrain" / "metrics.json").read_text())
    assert blocks["pretrain"]["parameters"] == metrics["parameters"]  # read back from the saved weights
    energy = blocks["pretrain"]["energy_kwh"] + blocks["sft"]["energy_kwh"]
    wall = blocks["pretrain"]["wall_s"] + blocks["sft"]["wall_s"]
    assert f"| **total** | | {cost.human_time(wall)} | {energy:.3g} |" in text


# ---------------------------------------------------------------------------------------------- --check's projection


def test_check_projects_gpu_time_energy_and_co2e_as_worked_out_by_hand(tmp_path, capsys):
    path = tiny_recipe(tmp_path, sft={"max_steps": -1, "num_train_epochs": 2, "global_batch_size": 32},
                       dpo={"max_steps": 10, "per_device_train_batch_size": 4, "use_cpu": True})
    recipe = load_recipe(path, ["run.carbon_intensity_g_per_kwh=200"])
    from pipeline.run import plan

    throughput = cost_check.Throughput(tflops=100, watts=300, mfu=0.5)
    launch = cluster.Launch(config="ddp.yaml", num_processes=4, distributed_type="MULTI_GPU")
    errors, _ = check.run_check(recipe, plan(recipe), lambda stage: launch, None, throughput)
    out = capsys.readouterr().out
    assert errors == 0, out
    params = memory.model_shape(recipe, None).params

    def by_hand(factor, steps, sequences, seq_len):
        flops = factor * params * steps * sequences * seq_len
        seconds = flops / (4 * 100e12 * 0.5)
        kwh = 4 * seconds / 3600 * 300 / 1000
        return seconds, kwh, kwh * 200 / 1000

    # pretrain: 12 steps x (4 processes x 8) blocks of 64 tokens, 6 FLOPs per parameter and token
    pretrain = by_hand(6, 12, 32, 64)
    # sft: 2 epochs over world.n_sft = 200 rows at 32 per step = 2 x 7 steps of 32 x max_length 128
    sft = by_hand(6, 14, 32, 128)
    # dpo: chosen and rejected, each trained (6) and through the frozen reference (2): 16; 10 steps of 4 x 4 pairs
    dpo_seq = recipe.config_default("dpo", "max_length")  # TRL's default: the pair's sequences are cut there
    dpo = by_hand(16, 10, 16, dpo_seq)
    results = {"pretrain": pretrain, "sft": sft, "dpo": dpo}
    for stage, (seconds, kwh, co2e) in results.items():
        p = check.check_stage(recipe, stage, launch, None, set(results), throughput).projection
        assert (p.parameters, p.gpus) == (params, 4)
        assert p.wall_s == pytest.approx(seconds) and p.energy_kwh == pytest.approx(kwh)
        assert p.co2e_kg == pytest.approx(co2e) and p.gpu_hours == pytest.approx(4 * seconds / 3600)
    assert check.check_stage(recipe, "sft", launch, None, set(results), throughput).projection.steps == 14
    total_kwh = sum(r[1] for r in results.values())
    total_co2e = sum(r[2] for r in results.values())
    assert f"| **total** | | {cost.human_time(sum(r[0] for r in results.values()))} | {total_kwh:.3g} | 200 | " \
           f"{total_co2e:.3g} |" in out
    assert "projected cost at 100 TFLOPS peak x MFU 0.5, 300 W per GPU" in out
    assert f"cost: {16 * params * 10 * 16 * dpo_seq:.3g} FLOPs (16 x" in out


def test_check_cost_options_are_checked_in_one_line(tmp_path):
    with pytest.raises(PipelineError, match="--mfu must be more than 0 and at most 1, got 1.5"):
        cost_check.Throughput(mfu=1.5)
    recipe = tiny_recipe(tmp_path)
    proc = run_cli(["pipeline/run.py", recipe, "--check", "--gpu-watts", "0"], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --gpu-watts must be more than 0, got 0.0"


def test_check_projects_epochs_over_a_list_of_world_splits():
    # small.yaml's sft and reward train on lists of world splits: all their rows, concatenated
    small = str(REPO / "recipes" / "small.yaml")
    recipe = load_recipe(small)
    for stage, splits, rows in (("sft", ("sft", "tool_sft"), 3000 + 1500),
                                ("reward", ("preference", "tool_preference"), 20000 + 1500)):
        keys = recipe.keys(stage)
        assert keys.dataset == [f"world:{split}" for split in splits]
        # the same steps as a single world split of the summed size
        single = load_recipe(small, [f"world.{cost_check.WORLD_ROWS[splits[0]]}={rows}",
                                     f"{stage}.dataset=world:{splits[0]}"])
        expected = cost_check.training_steps(single, stage, single.keys(stage), 32)
        assert expected[0] is not None and expected[1].endswith(f"epochs over {rows} rows")
        assert cost_check.training_steps(recipe, stage, keys, 32) == expected
    # a list with a dataset of unknown size among the world splits stays unprojected
    keys = SimpleNamespace(dataset=["world:sft", "data/samples/chat_tools.jsonl"])
    assert cost_check.training_steps(recipe, "sft", keys, 32)[0] is None
