"""engine.config: nested dataclasses from YAML with errors naming the dotted key."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from engine.config import (
    ConfigError,
    build_config,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)


@dataclass
class Inner:
    rate: float = 1e-3
    steps: int = 10
    kind: Literal["a", "b"] = "a"
    size: tuple[int, int] = (2, 3)
    path: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    flag: bool = False
    name: str = "x"


@dataclass
class NeedsValue:
    value: int


def test_defaults_and_nested_values():
    cfg = build_config(Outer, {"inner": {"rate": 2, "size": [4, 5], "path": "p"}, "flag": True})
    assert cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.size == (4, 5) and cfg.inner.steps == 10 and cfg.flag is True
    assert build_config(Outer, None) == Outer()


def test_unknown_key_names_the_dotted_path_and_the_file():
    with pytest.raises(ConfigError, match=r"'inner\.rte'.*in my\.yaml.*accepts: rate, steps"):
        build_config(Outer, {"inner": {"rte": 1.0}}, source="my.yaml")


@pytest.mark.parametrize("data, pattern", [
    ({"inner": {"steps": 1.5}}, r"'inner\.steps'.*integer"),
    ({"inner": {"steps": True}}, r"'inner\.steps'.*integer"),
    ({"inner": {"rate": "fast"}}, r"'inner\.rate'.*number"),
    ({"flag": 1}, r"'flag'.*true or false"),
    ({"inner": {"kind": "c"}}, r"'inner\.kind'.*one of \['a', 'b'\]"),
    ({"inner": {"size": [1, 2, 3]}}, r"'inner\.size'.*2 items"),
    ({"inner": {"size": [1, "q"]}}, r"'inner\.size\[1\]'.*integer"),
    ({"inner": 3}, r"'inner'.*mapping"),
    ({"name": None}, r"'name'.*may not be null"),
])
def test_wrong_types_are_rejected_with_the_key(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(Outer, data)


def test_required_field():
    with pytest.raises(ConfigError, match="'value'.*required"):
        build_config(NeedsValue, {})


def test_overrides_parse_yaml_values():
    assert parse_overrides(["inner.rate=0.5", "flag=true", "inner.size=[7, 8]", "inner.path=null"]) == {
        "inner": {"rate": 0.5, "size": [7, 8], "path": None}, "flag": True}
    # PyYAML reads 1e-2 (no dot) as a string; float fields still accept it
    assert build_config(Outer, parse_overrides(["inner.rate=1e-2"])).inner.rate == 1e-2
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["nokey"])


def test_yaml_file_overrides_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("inner:\n  steps: 20\n  kind: b\nname: run\n")
    cfg = load_config(Outer, path, ["inner.steps=30"])
    assert cfg.inner.steps == 30 and cfg.inner.kind == "b" and cfg.name == "run"
    saved = tmp_path / "resolved.yaml"
    save_config(cfg, saved)
    assert load_config(Outer, saved) == cfg
    assert config_to_dict(cfg)["inner"]["size"] == [2, 3]


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text("inner:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"'inner\.stepz'.*typo\.yaml"):
        load_config(Outer, typo)


def test_shipped_configs_load():
    """Every YAML in configs/ builds its config class (no unknown keys, right types), and no YAML
    there is left out of this list."""
    import json
    from pathlib import Path

    from engine.prior.train import PriorTrainConfig
    from engine.recon.config3d import Recon3DConfig
    from engine.recon.fit2d import Recon2DConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    two_d = ["demo2d.yaml", "reference2d.yaml", "inr2d.yaml", "inr_tv2d.yaml", "auto2d.yaml"]
    three_d = ["demo3d.yaml", "fullres3d.yaml", "colin27_1mm.yaml"]
    prior = ["prior_train.yaml"]
    assert sorted(p.name for p in root.glob("*.yaml")) == sorted(two_d + three_d + prior)
    configs_2d = [load_config(Recon2DConfig, root / name) for name in two_d]
    assert all(config.optim.steps > 0 for config in configs_2d)
    assert load_config(Recon2DConfig, root / "reference2d.yaml").prior.mode == "reference"
    assert load_config(Recon2DConfig, root / "auto2d.yaml").selection.enabled
    demo3d, fullres3d, colin27_1mm = (load_config(Recon3DConfig, root / name) for name in three_d)
    assert demo3d.plane_grids.enabled and demo3d.device == "auto"
    # the 1 mm config is the demo's regularisation x 0.25 (tuned on the 1 mm tuning case)
    for key in ("tv_weight", "wavelet_weight", "tv_x_weight"):
        assert getattr(colin27_1mm, key) == pytest.approx(0.25 * getattr(demo3d, key)), key
    assert fullres3d.steps > 0 and fullres3d.grad_sync in ("allreduce", "ddp", "deepspeed")
    # a config that names a prior folder (the 1 mm one keeps the prior its rows were measured with)
    # names one of the tree's, which loads
    from engine.prior import load_prior

    named = [c.prior.path for c in (*configs_2d, demo3d, fullres3d, colin27_1mm) if c.prior.path]
    assert named  # colin27_1mm's
    for path in named:
        assert load_prior(root.parent / path) is not None, path
    assert load_config(PriorTrainConfig, root / "prior_train.yaml").train.steps > 0
    for name in ("deepspeed_zero1.json", "deepspeed_zero2.json"):
        stage = json.loads((root / name).read_text())["zero_optimization"]["stage"]
        assert stage == int(name[-6])


def test_a_renamed_key_is_refused_with_its_new_name():
    """The old names of renamed keys (2D optim.final_lr_fraction, autocast_bf16) point to the new ones."""
    from engine.recon.fit2d import Recon2DConfig

    with pytest.raises(ConfigError, match=r"'optim\.final_lr_fraction': did you mean 'lr_final_fraction'\?"):
        load_config(Recon2DConfig, None, ["optim.final_lr_fraction=0.2"])
    with pytest.raises(ConfigError, match=r"'autocast_bf16': did you mean 'bf16'\?"):
        load_config(Recon2DConfig, None, ["autocast_bf16=false"])
    with pytest.raises(ConfigError, match=r"'optim\.stepz': did you mean 'steps'\?"):
        load_config(Recon2DConfig, None, ["optim.stepz=3"])
