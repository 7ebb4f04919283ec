"""The prepared GPU check (bench/gpu/check.py) on the CPU: `--tiny` runs every GPU part's code path in tiny form,
so what runs on the GPU machine has run here first; the guards, budget and watchdog behave as documented."""
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "bench" / "gpu" / "check.py"
PARTS = ("environment", "simulator", "training", "sim_stream", "quickstart")
sys.path.insert(0, str(CHECK.parent))

from harness import Budget, Report  # noqa: E402

pytestmark = pytest.mark.slow   # the whole --tiny check in a subprocess: minutes


def errors_in(value, where: str = "") -> list[str]:
    """Every place in the report that holds an "error" entry."""
    if isinstance(value, dict):
        found = [f"{where}: {value['error']}"] if "error" in value else []
        return found + [e for k, v in value.items() for e in errors_in(v, f"{where}/{k}")]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in errors_in(v, f"{where}[{i}]")]
    return []


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(CHECK), "--tiny", "--out", str(out), "--budget-s", "300"],
                          capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, report, out


def test_tiny_check_on_cpu_reports_every_part_without_errors(tiny_report):
    proc, report, out = tiny_report
    assert errors_in(report["parts"]) == [], proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(report["parts"]) == set(PARTS)
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped"), name
        if part["status"] == "skipped":
            assert isinstance(part["skipped"], str) and part["skipped"], name
        else:
            assert part.get("figures") or any(i.get("figures") for i in part.get("items", {}).values()), name
        assert 0 <= part["elapsed_s"] <= report["elapsed_s"]
    assert report["mode"] == "tiny" and report["summary"]["ok"] >= 3
    log = (out / "gpu_check.log").read_text()
    assert all(f"== part {name}" in log for name in PARTS)


def test_tiny_check_measures_the_cpu_paths(tiny_report):
    _, report, _ = tiny_report
    env = report["parts"]["environment"]["items"]
    assert env["torch"]["cuda_available"] is False
    assert env["process_group"] == {**env["process_group"], "backend": "gloo", "world_size": 1, "all_reduce_ok": True}
    assert env["deepspeed"]["version"] == metadata.version("deepspeed")
    assert env["bf16"]["ok"] is True

    sim = report["parts"]["simulator"]["items"]
    assert {k for k in sim} == {f"{p}/{c}" for p in ("model_i", "model_ii") for c in ("no_sub", "cdm", "axion")}
    assert sim["model_i/cdm"]["image"] == [1, 150, 150] and sim["model_ii/axion"]["image"] == [1, 64, 64]
    for figures in sim.values():
        assert figures["images_per_s"] > 0 and figures["cpu_1thread_images_per_s"] > 0
        assert figures["seconds_per_1e6_images"] == pytest.approx(1e6 / figures["images_per_s"], rel=1e-3)

    training = report["parts"]["training"]
    run = training["items"]["supervised/resnet18"]
    assert run["settings"]["steps"] == 3 and run["settings"]["device"] == "cpu"
    assert "--model.encoder.small_input_stem=true" in run["settings"]["command"]
    figures = run["figures"]
    assert figures["samples_per_s"] > 0 and figures["step_time_s"] > 0
    assert 0 <= figures["data_wait_fraction"] <= 1
    assert figures["metrics"]["step"] == 3 and 0 <= figures["metrics"]["val/accuracy"] <= 1
    assert run["plain"]["fp32"]["step_s"] > 0
    assert figures["engine_vs_plain_step_ratio"] == pytest.approx(
        figures["step_time_s"] / run["plain"]["fp32"]["step_s"], rel=0.01)
    assert training["figures"]["supervised/resnet18"]["step_time_s"] == figures["step_time_s"]

    stream = report["parts"]["sim_stream"]
    # the training config has data.source, so the part gets past its key check and stops at the CUDA guard
    assert stream["status"] == "skipped" and stream["skipped"] == "no CUDA" and "items" not in stream
    assert report["parts"]["quickstart"]["skipped"] == "no CUDA"


def test_a_failing_part_is_recorded_and_the_next_one_runs(tmp_path):
    report = Report(tmp_path, {"mode": "test"})

    def broken(entry, slice_s):
        raise ValueError("simulated failure")

    def item_fails(entry, slice_s):
        report.item(entry, "good", lambda item: item.update(figures={"x": 1.0}))
        report.item(entry, "bad", lambda item: 1 / 0)

    report.part("first", 10.0, broken)
    report.part("second", 10.0, item_fails)
    report.part("third", 10.0, lambda entry, slice_s: entry.update(figures={"y": 2.0}))
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    first, second, third = (saved["parts"][k] for k in ("first", "second", "third"))
    assert first["status"] == "error" and first["error"] == "ValueError: simulated failure"
    assert "broken" in first["traceback"]
    assert second["status"] == "error" and second["errors_in"] == ["bad"]
    assert second["items"]["good"]["status"] == "ok" and "ZeroDivisionError" in second["items"]["bad"]["error"]
    assert third["status"] == "ok" and third["figures"] == {"y": 2.0}
    assert saved["summary"] == {"error": 2, "ok": 1, "items_ok": 1, "items_error": 1}


def test_budget_gives_unused_time_to_later_parts():
    budget = Budget(100.0, {"a": 1.0, "b": 1.0, "c": 2.0})
    assert budget.slice_for("a") == pytest.approx(25.0, abs=0.5)
    budget.start -= 10.0               # part a took 10 s of its 25
    assert budget.slice_for("b") == pytest.approx(90.0 / 3, abs=0.5)
    budget.start -= 60.0               # part b overran: c gets what is left
    assert budget.slice_for("c") == pytest.approx(30.0, abs=0.5)


def test_watchdog_stops_a_check_past_its_budget_and_says_where(tmp_path):
    proc = subprocess.run([sys.executable, str(CHECK), "--out", str(tmp_path), "--budget-s", "1", "--grace-s", "1",
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 3
    assert report["stopped_by_watchdog"] is True
    assert report["parts"]["environment"]["error"].startswith("watchdog:")


class FakeMachine:
    """Stands in for every command of a full (GPU) check: what each would print or write, from its arguments, so
    the full-size planning and orchestration run here; `commands` records what the check asked for."""

    HELP = "usage: dlscale train [--stage {autoencoder,supervised,multitask,mae}] [--print-config]\n"
    CONFIG = "data:\n  source: shards\n  transforms: auto\n  num_workers: 2\n  simulator:\n    preset: model_ii\n" \
             "    eval_per_class: 1000\nloss:\n  method: fixed\n  fixed:\n    weights: null\n" \
             "train:\n  compile: false\n  channels_last: false\n"

    def __init__(self):
        self.commands: list[list[str]] = []

    def __call__(self, report, cmd, timeout_s, env=None, log_name=None, cwd=None):
        from harness import RESULT_PREFIX, CommandResult
        self.commands.append(cmd)
        lines: list[dict] = []
        value = dict(zip(cmd, cmd[1:]))
        if cmd[1].endswith("probes.py"):
            args = json.loads(cmd[3])
            if cmd[2] == "env":
                lines = [{"name": "torch", "cuda_available": True, "device_name": "Fake GPU", "torch": "2.11"},
                         {"name": "dlscale", "encoders": ["resnet18", "small", "vit_small"]}, {"name": "bf16"},
                         {"name": "process_group"}, {"name": "packages"}, {"name": "deepspeed", "version": "0"}]
            elif cmd[2] == "simulator":
                lines = [{"name": f"{p}/{c}", "class": c, "images_per_s": 1e5, "seconds_per_1e6_images": 10.0}
                         for p in args["batches"] for c in ("no_sub", "cdm", "axion")]
            else:
                lines = [{"name": f"{m['key']}/{v}", "variant": v, "step_s": 0.02} for m in args["models"]
                         for v in m["variants"]]
        elif cmd[-1] == "--help":
            lines = self.HELP if "dlscale.train" in cmd else "usage: --out OUT --scale {full} --seed --force"
        elif cmd[-1] == "--print-config":
            lines = self.CONFIG
        elif "simulate" in cmd:
            out = Path(value["--out"])
            out.mkdir(parents=True)
            side = 150 if value["--preset"] == "model_i" else 64
            (out / "manifest.json").write_text(json.dumps({"image_shape": [1, side, side], "splits": {
                "train": {"samples": 900}, "val": {"samples": 100}}}))
        elif "dlscale.train" in cmd:
            run = Path(value["--run-dir"])
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({"throughput/samples_per_s": 5000.0, "val/accuracy": 0.9}))
            (run / "log.txt").write_text("".join(f"step {i}: loss 1, {s} samples/s, {w}% waiting for data\n"
                                                 for i, (s, w) in enumerate([(100, 90), (6000, 5), (6400, 3)])))
        elif "quickstart" in cmd:
            (Path(value["--out"]) / "report.md").write_text("# dlscale quickstart report\n")
        output = lines if isinstance(lines, str) else "".join(RESULT_PREFIX + json.dumps(x) + "\n" for x in lines)
        return CommandResult(cmd, 0, output, 1.0, False)


def test_full_check_plans_every_gpu_run_through_the_cli(tmp_path, monkeypatch):
    import check
    from harness import Report
    fake = FakeMachine()
    monkeypatch.setattr(Report, "run", lambda self, *a, **k: fake(self, *a, **k))
    monkeypatch.setattr("shutil.which", lambda name: None)          # no nvidia-smi here
    assert check.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert errors_in(report["parts"]) == [] and all(p["status"] == "ok" for p in report["parts"].values())

    trains = [c for c in fake.commands if "torch.distributed.run" in c]
    assert all(c[c.index("-m", 2) + 1] == "dlscale.train" and "--deepspeed.precision=bf16" in c
               and "--device=cuda" in c for c in trains)
    training = report["parts"]["training"]["items"]
    rows = ["train.compile", "train.channels_last", "train.compile+channels_last", "workers=4", "workers=8"]
    assert list(training) == ["data", "supervised/resnet18", "multitask/resnet18", "autoencoder/resnet18",
                              "mae/resnet18", "supervised/vit_small", "supervised/resnet18 transforms=host",
                              *(f"supervised/resnet18 {row}" for row in rows)]
    for row, flags in zip(rows, [["compile"], ["channels_last"], ["compile", "channels_last"], [], []]):
        command = training[f"supervised/resnet18 {row}"]["settings"]["command"]
        assert all(f"--train.{flag}=true" in command for flag in flags), row
        assert training[f"supervised/resnet18 {row}"]["figures"]["speedup_vs_main_run"] == 1.0   # the fake's log
    assert training["supervised/resnet18 workers=4"]["settings"]["command"].endswith("--data.num_workers=4")
    host = training["supervised/resnet18 transforms=host"]
    assert host["status"] == "ok" and host["settings"]["command"].endswith("--data.transforms=host")
    run = training["supervised/resnet18"]
    assert run["settings"]["batch"] == 512 and 20 <= run["settings"]["steps"] <= 20000
    assert run["figures"]["throughput_source"] == "log"
    assert run["figures"]["samples_per_s_steady"] == 6200 and run["figures"]["data_wait_fraction"] == 0.04
    assert run["figures"]["engine_vs_plain_step_ratio"] == pytest.approx(512 / 6200 / 0.02, rel=1e-3)
    assert set(run["plain"]) == {"bf16_weights", "autocast_bf16"}
    assert set(training["mae/resnet18"]["plain"]) == {"bf16_weights"}
    assert sum("plain-loop" in c for c in fake.commands) == 2        # the training part's runs, the stream's run

    stream = report["parts"]["sim_stream"]
    assert "--data.source=simulate" in stream["settings"]["overrides"]
    assert "--data.simulator.preset=model_ii" in stream["settings"]["overrides"]
    stream_cmd = next(c for c in trains if "--data.source=simulate" in c)
    assert "--data" not in stream_cmd and "--schedule.batches_per_epoch" in " ".join(stream_cmd)
    quickstart = report["parts"]["quickstart"]
    assert [k for k in quickstart["items"]] == ["simulate", "autoencoder", "supervised", "multitask", "report"]
    multitask = next(c for c in trains if "multitask" in c and "--init-from" in c)
    assert "--loss.fixed.weights={recon: 1.0, classification: 1.0}" in multitask
    assert (tmp_path / "out" / "report.md").read_text().startswith("# dlscale quickstart report")
    assert report["parts"]["simulator"]["settings"]["batches"] == {"model_i": 1024, "model_ii": 4096}
