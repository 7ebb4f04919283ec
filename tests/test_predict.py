"""`dlscale predict` and the portable encoder (encoder.safetensors + encoder.json).

One tiny multitask run (recon + classification + regression of theta_E) on 1x20x20 separable images is trained in
this process; it then scores every DeepLense fixture layout (pickled axion pairs included), shards, bad and
malicious inputs, and the same folder on 2 ranks through torchrun. The safetensors encoder must give outputs bitwise
equal to encoder.pt's, load without any pickle, and the timm backbones must load into plain timm (strict)."""
import csv
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplense_fixtures import write_common_test, write_malicious_npy, write_model, write_model_iv
from dlscale.data.classes import CLASSES
from dlscale.data.deeplense import discover

SIDE = 20
HEADER = ["source", *(f"prob_{c}" for c in CLASSES), "predicted", "theta_E", "anomaly_score"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("predict")


@pytest.fixture(scope="module")
def run(work, make_separable, tiny_args) -> Path:
    data = make_separable(train=120, val=61, side=SIDE)
    return train("multitask", data, work / "run", *tiny_args, "--schedule.epochs=1", "--schedule.batches_per_epoch=3",
                 "--data.targets=[theta_E]")


@pytest.fixture(scope="module")
def layouts(work) -> dict[str, Path]:
    """A folder of each DeepLense layout: Model I has a wrapped axion and pickled [image, mass] pairs."""
    return {"common-test": write_common_test(work / "ct", {"train": 2, "val": 1}, size=SIDE),
            "model": write_model(work / "m1", n_train=3, n_test=1, size=SIDE),
            "model-iv": write_model_iv(work / "iv", n=2, size=16, hwc=False)}


def run_cli(*argv):
    """`dlscale.cli.main` in this process -> (exit code, stdout, stderr with the log), from any fixture scope."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    from conftest import CliResult
    from dlscale.cli import main
    from runs import own_logging
    out, err = io.StringIO(), io.StringIO()
    with own_logging(), redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return CliResult(code, out.getvalue(), err.getvalue())


def train(stage: str, data: Path, run_dir: Path, *extra) -> Path:
    result = run_cli("train", "--stage", stage, "--data", data, "--run-dir", run_dir, *extra)
    assert result.code == 0, result.err[-3000:]
    return run_dir


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def predict(*args, out: Path):
    return run_cli("predict", *args, "--out", out, "--no-progress", "--workers", "0")


def check_rows(rows: list[list[str]], sources: list[str]) -> None:
    assert rows[0] == HEADER
    assert [r[0] for r in rows[1:]] == sources
    probs = np.array([[float(x) for x in r[1:4]] for r in rows[1:]])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert [r[4] for r in rows[1:]] == [CLASSES[k] for k in probs.argmax(1)]
    assert all(np.isfinite(float(r[5])) and float(r[6]) >= 0 for r in rows[1:])


@pytest.mark.parametrize("layout", ["common-test", "model", "model-iv"])
def test_every_deeplense_layout_is_scored_once_per_file(run, layouts, work, layout):
    src = layouts[layout]
    extra = ["--resize"] if layout == "model-iv" else []     # Model IV fixture images are 16x16, the run's 20x20
    result = predict("--run", run, "--data", src, *extra, out=work / f"out-{layout}")
    assert result.code == 0, result.err[-3000:]
    sources = [str(f.path) for f in discover(src)[1]]
    check_rows(read_csv(work / f"out-{layout}/predictions.csv"), sources)
    if layout == "model":
        assert any(re.search(r"axion_sim_[12]\.npy$", s) for s in sources)   # the pickled [image, mass] pairs
    for name in CLASSES:
        assert re.search(rf"^  {name}\s+\d+ predicted", result.out, re.M), result.out


def test_npy_files_by_glob_single_file_and_bare_folder(run, layouts, work):
    files = sorted(str(p) for p in (layouts["model"] / "Model_I" / "cdm").glob("*.npy"))
    for data, expected in ((str(layouts["model"] / "Model_I" / "cdm" / "*.npy"), files), (files[0], files[:1]),
                           (str(layouts["model"] / "Model_I" / "cdm"), files)):
        result = predict("--run", run, "--data", data, out=work / "out-glob")
        assert result.code == 0, result.err[-3000:]
        check_rows(read_csv(work / "out-glob/predictions.csv"), expected)


def test_another_image_size_is_refused_naming_the_expected_size(run, layouts, work):
    result = predict("--run", run, "--data", layouts["model-iv"], out=work / "out-size")
    assert result.code == 2
    assert "expects 20x20" in result.err and "--resize" in result.err and "sim_0.npy" in result.err
    assert not (work / "out-size").exists()


def test_shards_agree_with_dlscale_eval(run, work, make_separable):
    data = make_separable(train=120, val=61, side=SIDE)
    out = work / "out-shards"
    result = predict("--run", run, "--data", data, "--split", "val", "--embeddings", "--batch-size", "16", out=out)
    assert result.code == 0, result.err[-3000:]
    rows = read_csv(out / "predictions.csv")
    assert rows[0] == HEADER and len(rows) == 62
    assert rows[1][0] == "val-000000.tar:record 0:sample 0"
    scores = np.load(run / "scores_val.npz")          # the run's own evaluation, in sample-id order as ours
    probs = np.array([[float(x) for x in r[1:4]] for r in rows[1:]])
    np.testing.assert_allclose(probs, scores["probs"], atol=1e-6)
    np.testing.assert_allclose([float(r[5]) for r in rows[1:]], scores["regression"][:, 0], rtol=1e-6)
    np.testing.assert_allclose([float(r[6]) for r in rows[1:]], scores["recon_mse"], rtol=1e-5)
    assert np.load(out / "embeddings.npy").shape == (61, 32)


def test_a_bare_encoder_gives_the_runs_embeddings(run, work, make_separable):
    data = make_separable(train=120, val=61, side=SIDE)
    out = work / "out-encoder"
    result = predict("--run", run / "encoder.safetensors", "--data", data, "--split", "val", "--batch-size", "16",
                     out=out)
    assert result.code == 0, result.err[-3000:]
    assert "only embeddings are available" in result.err
    rows = read_csv(out / "predictions.csv")
    assert rows[0] == ["source"] and len(rows) == 62
    assert np.array_equal(np.load(out / "embeddings.npy"), np.load(work / "out-shards/embeddings.npy"))


def test_two_ranks_give_the_output_of_one(run, layouts, work, venv_bin, launch):
    args = ["--run-dir", run, "--data", layouts["model"], "--embeddings", "--batch-size", "2"]   # torchrun: not --run
    one = predict(*args, out=work / "out-1rank")
    assert one.code == 0, one.err[-3000:]
    two = launch([venv_bin / "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "dlscale.cli", "predict",
                  *args, "--workers", "2", "--out", work / "out-2ranks"], work / "2ranks.log", Path.cwd())
    assert two.wait(300) == 0, two.output()[-4000:]
    for name in ("predictions.csv", "embeddings.npy"):
        assert (work / "out-1rank" / name).read_bytes() == (work / "out-2ranks" / name).read_bytes(), name
    assert len(read_csv(work / "out-2ranks/predictions.csv")) == 1 + len(discover(layouts["model"])[1])


@pytest.fixture
def damaged(layouts, tmp_path) -> tuple[Path, dict[str, Path]]:
    """A copy of the Model I folder with a truncated file, a NaN image and one of another shape."""
    src = tmp_path / "m1"
    shutil.copytree(layouts["model"], src)
    bad = {"corrupt": src / "Model_I/cdm/cdm_sim_1.npy", "nan": src / "Model_I/no_sub/no_sub_sim_2.npy",
           "shape": src / "Model_I_test/cdm/cdm_sim_0.npy"}
    bad["corrupt"].write_bytes(bad["corrupt"].read_bytes()[:100])
    np.save(bad["nan"], np.full((SIDE, SIDE), np.nan))
    np.save(bad["shape"], np.zeros((2, 3, SIDE, SIDE)))
    return src, bad


def test_a_bad_file_stops_the_run_naming_it_and_skip_bad_lists_it(run, damaged, tmp_path):
    src, bad = damaged
    stopped = predict("--run", run, "--data", src, out=tmp_path / "stopped")
    assert stopped.code == 2
    assert all(str(path) in stopped.err for path in bad.values()), stopped.err
    assert "NaN" in stopped.err and "--skip-bad" in stopped.err
    assert not (tmp_path / "stopped" / "predictions.csv").exists()

    out = tmp_path / "skipped"
    skipped = predict("--run", run, "--data", src, "--skip-bad", "--embeddings", out=out)
    assert skipped.code == 0, skipped.err[-3000:]
    rejected = json.loads((out / "rejected.json").read_text())
    assert rejected["count"] == 3
    assert sorted(r["source"] for r in rejected["rejected"]) == sorted(map(str, bad.values()))
    good = [str(f.path) for f in discover(src)[1] if f.path not in bad.values()]
    check_rows(read_csv(out / "predictions.csv"), good)
    assert len(np.load(out / "embeddings.npy")) == len(good)

    again = predict("--run", run, "--data", src, "--skip-bad", out=out)   # the same OUT, without --embeddings
    assert again.code == 0 and not (out / "embeddings.npy").exists()        # no stale file of the last call


def test_a_corrupt_shard_stops_the_run_naming_it_and_skip_bad_lists_it(run, make_separable, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(make_separable(train=120, val=61, side=SIDE), data)
    shard = data / "val-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    stopped = predict("--run", run, "--data", data, "--split", "val", out=tmp_path / "stopped")
    assert stopped.code == 2 and "val-000001.tar" in stopped.err, stopped.err[-2000:]
    assert not (tmp_path / "stopped").exists()
    skipped = predict("--run", run, "--data", data, "--split", "val", "--skip-bad", out=tmp_path / "skipped")
    assert skipped.code == 0, skipped.err[-2000:]
    assert [r["source"] for r in json.loads((tmp_path / "skipped/rejected.json").read_text())["rejected"]] == \
        ["val-000001.tar"]
    sources = [r[0] for r in read_csv(tmp_path / "skipped/predictions.csv")[1:]]
    assert 50 <= len(sources) < 61 and len(set(sources)) == len(sources)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_malicious_pickle_is_refused_and_its_payload_never_runs(run, layouts, tmp_path, workers):
    src, marker = tmp_path / "m1", tmp_path / "pwned"
    shutil.copytree(layouts["model"], src)
    evil = src / "Model_I/axion/axion_sim_2.npy"
    write_malicious_npy(evil, marker)
    refused = run_cli("predict", "--run", run, "--data", src, "--out", tmp_path / "out", "--no-progress",
                      "--workers", workers)
    assert refused.code == 2 and str(evil) in refused.err and "refused" in refused.err, refused.err[-2000:]
    assert not (tmp_path / "out" / "predictions.csv").exists()
    skipped = run_cli("predict", "--run", run, "--data", src, "--out", tmp_path / "out", "--no-progress",
                      "--workers", workers, "--skip-bad")
    assert skipped.code == 0, skipped.err[-2000:]
    assert [r["source"] for r in json.loads((tmp_path / "out/rejected.json").read_text())["rejected"]] == [str(evil)]
    assert not marker.exists()


def test_merge_orders_rows_by_key_whatever_rank_scored_them():
    """Rank 1 scored item 0 and rank 0 only rejected files: the merge keeps every column, in item order."""
    from dlscale.predict import merge
    empty = {"arrays": {"keys": np.zeros((0, 3), np.int64)}, "sources": [], "rejected": [("b.npy", "bad")]}
    scored = {"arrays": {"keys": np.array([[2, 0, 1], [0, 0, 1], [0, 0, 0]]), "probs": np.eye(3)},
              "sources": ["z", "y", "x"], "rejected": [("a.npy", "bad")]}
    merged = merge([empty, scored])
    assert merged.sources == ["x", "y", "z"] and merged.rejected == [("a.npy", "bad"), ("b.npy", "bad")]
    assert np.array_equal(merged.arrays["probs"], np.eye(3)[::-1])


# ---- the portable encoder -----------------------------------------------------------------------------------------

def test_the_safetensors_encoder_is_bitwise_the_pt_one_and_loads_without_pickle(run, monkeypatch):
    import dlscale
    from_pt = dlscale.load_encoder(run / "encoder.pt")

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used while loading the portable encoder")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    portable = [dlscale.load_encoder(run / "encoder.safetensors"), dlscale.load_encoder(run / "encoder.json"),
                dlscale.load_encoder(run)]
    monkeypatch.undo()
    images = torch.rand(5, 1, SIDE, SIDE)
    with torch.no_grad():
        expected = from_pt(images)
        for encoder in portable:
            assert torch.equal(encoder(images), expected)
            assert encoder.dlscale["image_shape"] == from_pt.dlscale["image_shape"] == [1, SIDE, SIDE]
            assert {k: v for k, v in encoder.dlscale.items() if k in from_pt.dlscale} == from_pt.dlscale
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["dlscale_version"] == dlscale.__version__ and meta["normalize"] == "minmax"
    assert meta["data"]["image_shape"] == [1, SIDE, SIDE] and meta["classes"] == list(CLASSES)


def test_weights_of_another_export_are_refused(run, tmp_path):
    import dlscale
    for name in ("encoder.json", "encoder.safetensors"):
        shutil.copy(run / name, tmp_path / name)
    meta = json.loads((tmp_path / "encoder.json").read_text())
    meta["weights_sha256"] = "0" * 64
    (tmp_path / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256 differs"):
        dlscale.load_encoder(tmp_path)


def test_an_encoder_json_whose_architecture_its_weights_do_not_fit_is_refused_naming_both_files_and_the_tensor(
        run, work, tmp_path):
    for name in ("encoder.json", "encoder.safetensors"):
        shutil.copy(run / name, tmp_path / name)
    meta = json.loads((tmp_path / "encoder.json").read_text())
    meta["encoder_config"]["width"] *= 2             # weights left as they are
    (tmp_path / "encoder.json").write_text(json.dumps(meta))
    result = predict("--run", tmp_path / "encoder.safetensors", "--data", work / "ct", out=tmp_path / "out")
    assert result.code == 2 and "Traceback" not in result.err
    width = meta["encoder_config"]["width"]
    assert f"the architecture in {tmp_path / 'encoder.json'} does not fit the weights in " \
           f"{tmp_path / 'encoder.safetensors'}: tensor " in result.err
    assert f"shape ({width}, 1, 3, 3) expected, ({width // 2}, 1, 3, 3) found" in result.err
    assert not (tmp_path / "out").exists()


def test_out_naming_an_existing_file_is_refused_and_the_file_left_as_it_is(run, work, tmp_path):
    out = tmp_path / "predictions.csv"
    out.write_text("mine\n")
    result = predict("--run", run, "--data", work / "ct", out=out)
    assert result.code == 2 and "Traceback" not in result.err
    assert f"--out {out}: is an existing file, expected a directory" in result.err
    assert out.read_text() == "mine\n"


PREDICT_DOC = Path(__file__).resolve().parents[1] / "docs" / "predict.md"


def docs_timm_block() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", PREDICT_DOC.read_text(), re.S)
              if "timm.create_model" in b]
    assert len(blocks) == 1, "docs/predict.md: expected one python block loading an encoder into timm"
    return blocks[0]


@pytest.mark.parametrize("name", ["vit_tiny", "convnext_nano"])
def test_a_timm_backbone_loads_into_timm_create_model(name, tmp_path):
    """encoder.json's `timm` recipe, as docs/predict.md uses it and as `rename_for_timm` applies it: strict loading
    into `timm.create_model`, and the same feature map as our encoder."""
    import timm
    from safetensors.torch import load_file
    from dlscale.export import rename_for_timm, save_portable_encoder
    from dlscale.models import EncoderConfig, build_encoder
    cfg, shape = EncoderConfig(name=name), (1, 32, 32)
    torch.manual_seed(0)
    ours = build_encoder(cfg, shape).eval()
    save_portable_encoder(tmp_path, ours, cfg, {"image_shape": list(shape), "classes": list(CLASSES)})
    x = torch.rand(2, *shape)
    namespace = {"x": x}
    exec(docs_timm_block().replace("runs/vit", str(tmp_path)), namespace)   # noqa: S102 - the docs' own code
    recipe = json.loads((tmp_path / "encoder.json").read_text())["timm"]
    model = timm.create_model(recipe["model"], pretrained=False, **recipe["kwargs"]).eval()
    model.load_state_dict(rename_for_timm(load_file(tmp_path / "encoder.safetensors"), recipe["rename"]),
                          strict=True)
    with torch.no_grad():
        expected = ours(x)
        for timm_model in (model, namespace["model"].eval()):
            theirs = timm_model.forward_features(x)
            theirs = timm_model.head.norm(theirs) if name == "convnext_nano" else \
                theirs.transpose(1, 2).reshape(expected.shape)
            torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-6)
