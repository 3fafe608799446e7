"""Telemetry profiles: loading, validation errors that name the field, overrides."""

from __future__ import annotations

import ast
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import yaml

import esper
from esper.nissa import (
    PROFILE_NAMES,
    ProfileError,
    TelemetryConfig,
    apply_overrides,
    load_profile,
    load_profile_file,
    profiles_dir,
)


def test_profiles_are_package_data_identical_to_top_level() -> None:
    """The named profiles ship inside esper.nissa (an installed wheel has no repo tree); the
    repository's top-level profiles/ (the design card's layout) holds identical copies."""
    packaged = resources.files("esper.nissa").joinpath("profiles")
    names = sorted(q.name for q in packaged.iterdir() if q.name.endswith(".yaml"))
    assert names == sorted(f"{n}.yaml" for n in PROFILE_NAMES)
    top = Path(esper.__file__).resolve().parents[1] / "profiles"
    assert sorted(p.name for p in top.glob("*.yaml")) == names
    for name in names:
        assert packaged.joinpath(name).read_text(encoding="utf-8") == (top / name).read_text(encoding="utf-8"), name


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_every_profile_loads_through_importlib_resources(name: str) -> None:
    text = resources.files("esper.nissa").joinpath("profiles", f"{name}.yaml").read_text(encoding="utf-8")
    assert load_profile(name) == TelemetryConfig.model_validate(yaml.safe_load(text))
    assert load_profile(name).name == name and profiles_dir().joinpath(f"{name}.yaml").is_file()


def test_pyproject_ships_profiles_as_package_data() -> None:
    root = Path(esper.__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    assert "profiles/*.yaml" in data["tool"]["setuptools"]["package-data"]["esper.nissa"]


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_every_profile_loads(name: str) -> None:
    cfg = load_profile(name)
    assert isinstance(cfg, TelemetryConfig)
    assert cfg.name == name


def test_profiles_grow_monotonically() -> None:
    m, s, d, r = (load_profile(n) for n in PROFILE_NAMES)
    assert not m.gradients.enabled and s.gradients.enabled
    assert not s.per_class.enabled and d.per_class.enabled
    assert not d.loss_landscape.enabled and r.loss_landscape.enabled
    assert r.gradients.full_histogram and r.track_activation_stats
    assert [m.escalate_to, s.escalate_to, d.escalate_to] == ["standard", "diagnostic", "research"]


def test_unknown_profile_name() -> None:
    with pytest.raises(ProfileError, match="unknown telemetry profile 'nope'"):
        load_profile("nope")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("gradients:\n  enabled: true\n  bogus_key: 1\n", "gradients.bogus_key"),
        ("bogus_top: 1\n", "bogus_top"),
        ("per_class:\n  track_everything: true\n", "per_class.track_everything"),
        ("loss_landscape:\n  perturbation_samples: 0\n", "loss_landscape.perturbation_samples"),
        ("history_length: -1\n", "history_length"),
        ("gradients:\n  percentiles: [50, 150]\n", "gradients.percentiles"),
        ("gradients:\n  histogram_bins: 1\n", "gradients.histogram_bins"),
        ("gradients:\n  layers: []\n", "gradients.layers"),
        ("escalate_to: turbo\n", "escalate_to"),
        ("escalation_epochs: 0\n", "escalation_epochs"),
        ("track_weight_norms: maybe\n", "track_weight_norms"),
    ],
)
def test_bad_profile_file_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profile_file(path)
    assert field in str(info.value)
    assert str(path) in str(info.value)


def test_non_mapping_and_bad_yaml_rejected(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ProfileError, match="mapping"):
        load_profile_file(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("gradients: [unclosed\n")
    with pytest.raises(ProfileError, match="invalid YAML"):
        load_profile_file(tmp_path / "broken.yaml")


def test_overrides_parse_and_revalidate() -> None:
    base = load_profile("minimal")
    cfg = apply_overrides(
        base,
        [
            "gradients.enabled=true",
            "history_length=20",
            "gradients.percentiles=[99, 1]",
            "gradients.layers=[conv1, fc]",
            "escalate_to=null",
        ],
    )
    assert cfg.gradients.enabled is True
    assert cfg.history_length == 20
    assert cfg.gradients.percentiles == [1.0, 99.0]
    assert cfg.gradients.layers == ["conv1", "fc"]
    assert cfg.escalate_to is None
    assert base.gradients.enabled is False  # the original is untouched


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("gradients.nope=1", "'nope'"),
        ("nope=1", "'nope'"),
        ("history_length=abc", "history_length"),
        ("gradients.histogram_bins=0", "gradients.histogram_bins"),
        ("history_length", "key=value"),
        ("history_length.deeper=3", "'deeper'"),
    ],
)
def test_bad_overrides_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ProfileError) as info:
        apply_overrides(load_profile("standard"), [override])
    assert needle in str(info.value)


def test_only_one_telemetry_config_class_in_package() -> None:
    root = Path(esper.__file__).resolve().parent
    found = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        found += [
            path
            for n in ast.walk(tree)
            if isinstance(n, ast.ClassDef) and n.name == "TelemetryConfig"
        ]
    assert [p.name for p in found] == ["config.py"]
