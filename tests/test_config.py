"""Config loading: precedence, validation that reports every problem, and the shipped recipes."""

from pathlib import Path

import pytest
import yaml

from lstm_lm.config import FIELDS, Config, demo_config, load_config, recipe_path
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


def test_the_demo_recipe_has_one_source_and_recipes_load_by_name():
    assert (Path(__file__).resolve().parents[1] / "configs").resolve() == recipe_path("demo").parent.resolve()
    assert demo_config() == load_config(recipe_path("demo")) == load_config("demo")
    assert load_config("ptb-small").model.num_layers == 2
    with pytest.raises(ConfigError, match="built-in recipes: demo"):
        load_config("no-such-recipe")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data.source=yes", "yes"),
        ("data.source=null", "null"),
        ("data.source=1e3", "1e3"),
        ("data.source=true", "true"),
        ("data.cache_dir=null", None),
        ("data.cache_dir=./null", "./null"),
    ],
)
def test_a_path_is_a_path_whatever_yaml_would_make_of_it(text, expected):
    key, _, _ = text.partition("=")
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [text]), section), name) == expected


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("train.compile=yes", "compile", True),
        ("train.compile=off", "compile", False),
        ("train.max_steps=null", "max_steps", None),
        ("train.max_steps=1e3", "max_steps", 1000),
        ("train.lr=2", "lr", 2.0),
        ("model.hidden_sizes=300,200", "hidden_sizes", [300, 200]),
    ],
)
def test_set_strings_are_read_as_the_fields_type(text, key, expected):
    cfg = load_config(None, [text, "model.tie_weights=false"])
    section = text.split(".")[0]
    assert getattr(getattr(cfg, section), key) == expected


def test_typed_values_stay_typed_and_win():
    cfg = load_config(None, ["train.epochs=3"], values={"train.epochs": 4, "data.source": "no"})
    assert cfg.train.epochs == 4 and cfg.data.source == "no"
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(None, values={"train.epochs": "many"})


def test_every_field_is_declared_with_help_and_bounds_drive_validation():
    for key, spec in FIELDS.items():
        assert spec.help.strip(), key
    bounded = [k for k, s in FIELDS.items() if "ge" in s.bounds and s.base_type is int]
    assert len(bounded) > 10
    for key in bounded:
        low = FIELDS[key].bounds["ge"]
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}={int(low) - 1}"])


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
    [
        ("nonsense", "--set"),
        ("nokey=1", "--set"),
        ("model.layers=2", "model.layers"),
        ("train.batch_size=0", "train.batch_size"),
        ("data.tokenizer=sentencepiece", "data.tokenizer"),
        ("train.device=tpu", "train.device"),
        ("model.tie_weights=maybe", "model.tie_weights"),
        ("model.cell=transformer", "model.cell"),
        ("data.gap_min=5 data.gap_max=2", "data.gap_min"),
        ("data.gap_min=-1", "data.gap_min"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override.split(" "))


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


def test_per_layer_sizes_from_yaml_and_the_command_line(tmp_path):
    f = tmp_path / "awd.yaml"
    f.write_text("model:\n  num_layers: 3\n  hidden_sizes: [1150, 1150, 400]\n  embedding_size: 400\n")
    cfg = load_config(f)
    assert cfg.model.layer_sizes == [1150, 1150, 400]
    cfg = load_config(f, ["model.hidden_sizes=[64, 64, 400]"])
    assert cfg.model.layer_sizes == [64, 64, 400]
    assert load_config(None, ["model.num_layers=3"]).model.layer_sizes == [200, 200, 200]


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.hidden_sizes=[100, 200]", "model.hidden_sizes"),  # 2 sizes for 2 layers, but tied to 200: ok below
        ("model.hidden_sizes=[200]", "model.hidden_sizes"),  # 1 size, 2 layers
        ("model.hidden_sizes=[0, 200]", "model.hidden_sizes"),
        ("model.hidden_sizes=big", "model.hidden_sizes"),
        ("model.hidden_sizes=[200, 100]", "model.tie_weights"),
        ("model.weight_drop=1", "model.weight_drop"),
        ("model.dropout_input=-0.1", "model.dropout_input"),
        ("train.schedule=linear", "train.schedule"),
        ("train.min_lr=50", "train.min_lr"),
        ("train.stop_lr=20", "train.stop_lr"),  # not below lr: the run would end at once
        ("train.stop_lr=0", "train.stop_lr"),
        ("train.stop_lr=0.1", ""),  # a plateau schedule's: fine
        ("train.nonmono=0", "train.nonmono"),
        ("train.time_budget=0", "train.time_budget"),
        ("train.ar=-1", "train.ar"),
        ("train.warmup_steps=-5", "train.warmup_steps"),
        ("train.compile_mode=reduce-overhead", "train.compile_mode"),  # without train.compile
        ("train.compile_mode=fastest", "train.compile_mode"),
        ("train.loss_impl=blocked", "train.loss_impl"),
    ],
)
def test_regularization_and_schedule_values_are_checked(override, key):
    if override == "model.hidden_sizes=[100, 200]":
        assert load_config(None, [override]).model.layer_sizes == [100, 200]
        return
    if not key:
        assert load_config(None, [override])
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_incompatible_training_options_are_refused():
    with pytest.raises(ConfigError, match="nt_asgd.*sgd"):
        load_config(None, ["train.nt_asgd=true", "train.optimizer=adamw"])
    with pytest.raises(ConfigError, match="stop_lr.*cosine"):
        load_config(None, ["train.stop_lr=0.1", "train.schedule=cosine"])
    with pytest.raises(ConfigError, match="variable_bptt.*compile"):
        load_config(None, ["train.variable_bptt=true", "train.compile=true"])
