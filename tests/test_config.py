from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from tilenet.config import (
    JobsConfig,
    ReaderConfig,
    TilingConfig,
    load_config,
    save_config,
    split_config_args,
)
from tilenet.errors import ConfigError
from tilenet.io import open_image
from tilenet.jobs import run_jobs
from tilenet.patches.tiler import tile_images


def test_defaults_yaml_then_overrides(tmp_path: Path) -> None:
    conf = tmp_path / "x.yaml"
    conf.write_text("train:\n  lr: 0.5\n  steps: 7\nmodel:\n  name: tiny\n")
    cfg = load_config(conf, ["train.steps=9", "infer.mode=gaussian"])
    assert cfg.train.lr == 0.5  # from YAML
    assert cfg.train.steps == 9  # override wins over YAML
    assert cfg.model.name == "tiny"
    assert cfg.infer.mode == "gaussian"
    assert cfg.infer.tile == 1024  # untouched default


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=1", "'train.lrr'"),
        ("nosuch.key=1", "'nosuch'"),
    ],
)
def test_unknown_key_names_it_and_lists_valid(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    msg = str(exc.value)
    assert needle in msg
    assert "valid keys" in msg
    assert "\n" not in msg


def test_unknown_key_in_yaml_lists_section_keys(tmp_path: Path) -> None:
    conf = tmp_path / "bad.yaml"
    conf.write_text("infer:\n  tiles: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'infer\.tiles'.*tile"):
        load_config(conf)


def test_bad_choice_and_type_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"infer\.mode"):
        load_config(None, ["infer.mode=seamless"])
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(None, ["train.steps=many"])


def test_values_are_never_evaluated(tmp_path: Path) -> None:
    # A string that would do something if eval'd stays a string (or is rejected by type).
    cfg = load_config(None, ["train.out_dir=__import__('os').getcwd()"])
    assert cfg.train.out_dir == "__import__('os').getcwd()"


def test_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_save_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=0.25", "model.kwargs.depth=3"])
    out = save_config(cfg, tmp_path / "run")
    assert out.name == "config.yaml"
    again = load_config(out)
    assert again.train.lr == 0.25
    assert again.model.kwargs == {"depth": 3}
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_split_config_args_separates_conf_overrides_and_paths() -> None:
    items = ["a.tif", "conf=x.yaml", "infer.tile=512", "dir/b=c.tif", "model.kwargs.depth=3"]
    conf, overrides, rest = split_config_args([*items, "c.tif", "x=1"])
    assert conf == "x.yaml"
    assert overrides == ["infer.tile=512", "model.kwargs.depth=3"]
    # not section.key=value: paths, even with "=" in them, and undotted keys
    assert rest == ["a.tif", "dir/b=c.tif", "c.tif", "x=1"]
    assert split_config_args([]) == (None, [], [])
    with pytest.raises(ConfigError, match="at most once"):
        split_config_args(["conf=a.yaml", "conf=b.yaml"])


#: Each stage section whose keys are the keyword options of one function, with its consumer.
CONSUMERS: list[tuple[type, Callable[..., Any]]] = [
    (ReaderConfig, open_image),
    (TilingConfig, tile_images),
    (JobsConfig, run_jobs),
]


@pytest.mark.parametrize(("section", "consumer"), CONSUMERS, ids=lambda v: v.__name__)
def test_every_key_is_an_option_of_its_consumer_with_the_same_default(
    section: type, consumer: Callable[..., Any]
) -> None:
    # A key the consumer does not take would do nothing; a different default would mean the
    # default lives in two places. (Behaviour per key: tests/patches/test_tiler.py, test_cli*.py.)
    params = inspect.signature(consumer).parameters
    for f in fields(section):
        assert f.name in params, f"{section.__name__}.{f.name} does not reach {consumer}"
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[f.name].default == getattr(section(), f.name), f.name
