"""Every option is a typed config key: task options, the simulator's keys and loss-weighting options are listed by
`--print-config` with what they mean, and a misspelt one fails at load naming its dotted key, before a run
directory exists. Files carry a format version; those without one (dlscale 0.1) are translated by dlscale.compat."""
from dataclasses import dataclass

import pytest
import yaml

from dlscale.compat import FORMAT_VERSION, format_version, upgrade_config
from dlscale.configtree import commented_yaml, field_docs, plain, to_dict
from dlscale.models.mae import MAEConfig
from dlscale.train.cli import main
from dlscale.train.config import load_config, print_config
from dlscale.train.tasks.contrastive import ContrastiveConfig
from dlscale.train.weighting import LossWeighting, WEIGHTINGS, register_weighting


def printed(capsys, *argv) -> str:
    assert main([*map(str, argv), "--print-config"]) == 0
    return capsys.readouterr().out


def test_print_config_lists_the_stage_tasks_options_with_their_meaning(capsys):
    out = printed(capsys, "--stage", "mae")
    tree = yaml.safe_load(out)
    assert tree["model"]["task_options"] == {"mae": plain(to_dict(MAEConfig()))}
    assert "mask_ratio: 0.75" in out and "# Fraction of the patches hidden" in out
    assert tree["format_version"] == FORMAT_VERSION
    out = printed(capsys, "--stage", "contrastive")
    views = yaml.safe_load(out)["model"]["task_options"]["contrastive"]["views"]
    assert views == plain(to_dict(ContrastiveConfig().views)) and "max_shift" in views
    assert "# Largest shift in pixels" in out


def test_print_config_with_simulated_data_lists_the_simulator_keys(capsys, tmp_path):
    out = printed(capsys, "--stage", "supervised", "--data.source=simulate", "--data.simulator.preset=model_iii",
                  "--data.simulator.overrides={lens.randomize: true}")
    overrides = yaml.safe_load(out)["data"]["simulator"]["overrides"]
    assert {"instrument", "lens", "source", "substructure", "cosmology"} <= set(overrides)
    assert overrides["lens"]["randomize"] is True and overrides["instrument"]["n_pix"] == 64
    assert "n_pix" in out and "pixel_scale" in out
    (tmp_path / "c.yaml").write_text(out)     # what is printed loads back to the same simulator
    again = load_config(tmp_path / "c.yaml").data.simulator.simulator_config()
    assert again == load_config(None, ["--data.source=simulate", "--data.simulator.preset=model_iii",
                                       "--data.simulator.overrides={lens.randomize: true}"]
                                ).data.simulator.simulator_config()


@pytest.mark.parametrize("stage, option, key", [
    ("mae", "--model.task_options.mae.mask_ration=0.5", "model.task_options.mae.mask_ration"),
    ("contrastive", "--model.task_options.contrastive.views.max_shfit=2",
     "model.task_options.contrastive.views.max_shfit"),
    ("mae", "--model.task_options.maee.mask_ratio=0.5", "model.task_options.maee"),
    ("mae", "--model.task_options.recon.width=8", "model.task_options.recon"),
    ("supervised", "--loss.options.nosuch.x=1", "loss.options.nosuch"),
    ("supervised", "--data.simulator.overrides={lens.randomise: true}", "data.simulator.overrides.lens.randomise"),
])
def test_a_misspelt_option_fails_at_load_naming_the_dotted_key(stage, option, key, cli, tmp_path):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [option], stage=stage)
    result = cli("train", "--stage", stage, "--data.source=simulate", "--schedule.batches_per_epoch=1",
                 "--run-dir", tmp_path / "run", option)
    assert result.code == 2 and key in result.err and not (tmp_path / "run").exists()


def test_options_of_a_weighting_registered_outside_dlscale_are_typed(capsys):
    @dataclass
    class Opts:
        scale: float = 1.0
        """How much."""

    @register_weighting
    class Scaled(LossWeighting):
        name = "scaled_for_test"
        Config = Opts
    try:
        cfg = load_config(None, ["--loss.method=scaled_for_test"])
        assert cfg.loss.method_options() == Opts()
        cfg = load_config(None, ["--loss.method=scaled_for_test", "--loss.options.scaled_for_test.scale=2"])
        assert cfg.loss.method_options() == Opts(scale=2.0)
        assert "# How much." in print_config(cfg)
        with pytest.raises(ValueError, match=r"loss\.options\.scaled_for_test\.scal'"):
            load_config(None, ["--loss.method=scaled_for_test", "--loss.options.scaled_for_test.scal=2"])
    finally:
        WEIGHTINGS.pop("scaled_for_test")


def test_field_docs_read_attribute_docstrings_and_line_comments():
    docs = field_docs(MAEConfig)
    assert docs["mask_ratio"].startswith("Fraction of the patches hidden")
    from dlscale.sim.config import InstrumentConfig
    assert field_docs(InstrumentConfig)["n_pix"] == "image side (pixels)"
    cfg = load_config(None, ["--data.source=simulate"], stage="multitask")
    assert yaml.safe_load(commented_yaml(cfg)) == plain(to_dict(cfg))


def test_format_versions():
    assert format_version({}) == 1 and format_version({"format_version": FORMAT_VERSION}) == FORMAT_VERSION
    with pytest.raises(ValueError, match="newer"):
        format_version({"format_version": FORMAT_VERSION + 1}, "config.yaml")
    old = {"loss": {"weights": {"recon": 1.0}, "temperature": 2.0}, "stage": "autoencoder",
           "model": {"encoder": {"weights_path": "x.pt"}}}
    assert upgrade_config(old) == {"loss": {"fixed": {"weights": {"recon": 1.0}}, "dwa": {"temperature": 2.0}},
                                   "stage": "autoencoder", "init_from": "x.pt",
                                   "model": {"encoder": {}, "task_options": {"recon": {"decoder": "wide"}}}}
    # a file of today's version is taken as written: 0.1's detection does not run on it
    today = {"format_version": FORMAT_VERSION, "loss": {"fixed": {"weights": None}}}
    assert upgrade_config(dict(today)) == {"loss": {"fixed": {"weights": None}}}
