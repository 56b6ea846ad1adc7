"""Config loading: precedence, validation that reports every problem, and the shipped recipes."""

from pathlib import Path

import pytest
import yaml

from lstm_lm.config import DEMO_PRESET, Config, load_config
from lstm_lm.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == Config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():  # the YAML mirrors the dataclass fields exactly
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value
    assert path.read_text().startswith("#"), "each recipe opens with a comment giving its command"


def test_demo_yaml_equals_the_built_in_demo_preset():
    from_file = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert from_file == load_config(preset=DEMO_PRESET)


def test_precedence_defaults_yaml_then_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  hidden_size: 64\n  embedding_size: 64\ntrain:\n  lr: 1.5\n")
    cfg = load_config(f, ["train.lr=3", "bptt=70", "model.tie_weights=false", "data.max_size=null"])
    assert cfg.model.hidden_size == 64 and cfg.train.lr == 3.0 and cfg.train.bptt == 70
    assert cfg.model.tie_weights is False and cfg.data.max_size is None
    assert cfg.model.num_layers == Config().model.num_layers


def test_all_problems_are_reported_together(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(
        "model:\n  hidden_size: 100\n  embedding_size: 200\n  dropout: 1.5\n  colour: red\n"
        "train:\n  lr: -1\n  optimizer: adam\n  epochs: many\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(f)
    message = str(err.value)
    for key in ("model.colour", "model.dropout", "model.tie_weights", "train.lr", "train.optimizer", "train.epochs"):
        assert key in message, key
    assert len(err.value.problems) == 6


@pytest.mark.parametrize(
    "override, key",
    [("nonsense", "--set"), ("nokey=1", "--set"), ("model.layers=2", "model.layers"),
     ("train.batch_size=0", "train.batch_size"), ("data.tokenizer=sentencepiece", "data.tokenizer"),
     ("train.device=tpu", "train.device"), ("model.tie_weights=maybe", "model.tie_weights")],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    f = tmp_path / "broken.yaml"
    f.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(f)
