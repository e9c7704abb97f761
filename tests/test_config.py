import dataclasses
from dataclasses import dataclass, field

import pytest

from mtnlg.config import Config, ConfigError, dump_yaml, load_config, replace

pytestmark = pytest.mark.unit

CHECKS = {"inner": 0}


@dataclass
class Inner(Config):
    steps: int = field(default=10, metadata={"min": 1})
    lr: float = field(default=1e-3, metadata={"gt": 0})
    norm: str = field(default="layernorm", metadata={"choices": ("layernorm", "rmsnorm")})
    layers: list[int] = field(default_factory=lambda: [1, 2])

    def validate(self):
        CHECKS["inner"] += 1
        if self.steps > 1000 and self.lr > 1:
            raise ConfigError(f"lr={self.lr} too large for steps={self.steps}")


@dataclass
class Outer(Config):
    name: str = "run"
    seed: int | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_defaults_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ninner:\n  steps: 5\n")
    cfg = load_config(Outer, p, ["inner.lr=0.5", "flag=true", "seed=7", "inner.layers=3,4"])
    assert (cfg.name, cfg.seed, cfg.flag) == ("x", 7, True)
    assert (cfg.inner.steps, cfg.inner.lr, cfg.inner.layers) == (5, 0.5, [3, 4])
    assert load_config(Outer, None, ["seed=none"]).seed is None
    again = replace(cfg, ["inner.norm=rmsnorm"])
    assert again.inner.norm == "rmsnorm" and again.inner.steps == 5
    assert "steps: 5" in dump_yaml(cfg)


@pytest.mark.parametrize("override, message", [
    (["inner.setps=3"], "unknown key 'inner.setps'; did you mean 'steps'"),
    (["nope=1"], "unknown key 'nope'"),
    (["inner.steps=ten"], "inner.steps: expected int, got 'ten'"),
    (["inner.steps=0"], "inner.steps: must be >= 1, got 0"),
    (["inner.lr=0"], "inner.lr: must be > 0"),
    (["inner.norm=batchnorm"], "inner.norm: expected one of ['layernorm', 'rmsnorm'], got 'batchnorm'"),
    (["flag=maybe"], "flag: expected bool, got 'maybe'"),
    (["inner.steps=2000", "inner.lr=2"], "lr=2.0 too large for steps=2000"),
    (["inner"], "not of the form key=value"),
])
def test_errors_name_key_and_value(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, override)
    assert message in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(Outer, bad)
    typed = tmp_path / "typed.yaml"
    typed.write_text("inner: 3\n")
    with pytest.raises(ConfigError, match="inner: expected a mapping"):
        load_config(Outer, typed)


def test_every_value_is_checked_once_where_the_config_is_made():
    CHECKS["inner"] = 0
    cfg = load_config(Outer, None, ["inner.steps=5", "inner.lr=0.5"])
    assert CHECKS["inner"] == 1                       # one load, one check
    with pytest.raises(ConfigError, match="steps: must be >= 1, got 0"):
        dataclasses.replace(cfg.inner, steps=0)       # a copy made in Python is checked too
    with pytest.raises(ConfigError, match="lr=2 too large for steps=2000"):
        Inner(steps=2000, lr=2)                       # and a constructor call
    CHECKS["inner"] = 0
    Outer(inner=cfg.inner)                            # a valid part is not checked again
    assert CHECKS["inner"] == 0
