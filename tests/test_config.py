"""Config loading: presets, YAML files, ``--set`` overrides, validation and the CLI on top."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.cli import main
from aura.config import (
    PRESETS,
    AuraConfig,
    DataConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    explain_config,
    load_config,
    override_text,
    read_presets,
)
from aura.errors import ConfigError
from aura.field_docs import field_docs
from aura.models import ModelConfig, model_config_class, model_names

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Every preset's resolved config (`config_to_dict(load_config(preset=name))`), recorded when the
# presets were Python dicts, so moving or rewriting them cannot silently change a run.
PINNED_PRESETS = Path(__file__).resolve().parent / "data" / "preset_configs.json"


def _get(cfg: AuraConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(**kwargs: Any) -> str:
    """The message of the ConfigError ``load_config(**kwargs)`` raises, checked to be one line."""
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


# --- presets ---------------------------------------------------------------------------------


def test_presets_are_listed_in_order() -> None:
    assert list(PRESETS) == [
        "demo", "cpu-small", "m1-8gb", "gpu-4gb", "l4-24gb", "a100-40gb", "a100-80gb",
        "hippocampal-157m", "hippocampal-cpu", "bdh-ref", "bdh-cpu", "snn-rag-cpu", "snn-rag",
        "brain-cpu", "neurogen-4gb",
    ]
    assert all(p.description for p in PRESETS.values())


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_loads_with_its_values(name: str) -> None:
    cfg = load_config(preset=name)
    assert cfg.model.n_embd % cfg.model.n_head == 0
    for key, value in PRESETS[name].overrides.items():
        assert _get(cfg, key) == value, key


def test_every_preset_resolves_to_its_pinned_config() -> None:
    """A field added later is not in the record and takes its default; every recorded value must
    still resolve the same (rewrite the record when a preset changes on purpose)."""
    pinned = json.loads(PINNED_PRESETS.read_text(encoding="utf-8"))
    assert list(pinned) == list(PRESETS)
    for name, sections in pinned.items():
        resolved = config_to_dict(load_config(preset=name))
        for section, values in sections.items():
            for key, value in values.items():
                assert resolved[section][key] == value, f"{name}: {section}.{key}"


def test_a_preset_starts_from_one_above_it_and_its_own_keys_win(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "base:\n  description: the base\n  model: {n_layer: 2}\n"
        "  train: {lr: 1e-2, batch_size: 4}\n"
        "child:\n  description: >-\n    on top,\n    folded\n  preset: base\n"
        "  model: {name: bdh}\n  train: {lr: 3e-4}\n",
    )
    presets = read_presets(path)
    assert list(presets) == ["base", "child"]
    assert presets["base"].overrides == {"model.n_layer": 2, "train.lr": 1e-2,
                                         "train.batch_size": 4}
    assert presets["child"].description == "on top, folded"
    assert presets["child"].overrides == {"model.n_layer": 2, "model.name": "bdh",
                                          "train.lr": 3e-4, "train.batch_size": 4}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "must map preset names to presets"),
        ("- demo\n", "must map preset names to presets"),
        ("a: 3\n", "preset 'a': expected a mapping"),
        ("a: {model: {n_layer: 2}}\n", "preset 'a': description must be a non-empty string"),
        ("a: {description: ' '}\n", "description must be a non-empty string"),
        ("a: {description: x, preset: b}\nb: {description: y}\n",
         "preset 'a': preset must name a preset defined above this one, got 'b'"),
        ("a: {description: x, preset: a}\n", "defined above this one, got 'a'"),
        ("a: {description: x, preset: [b]}\n", "defined above this one, got ['b']"),
        ("a: {description: x, train: {lrr: 1}}\n", "did you mean 'train.lr'"),
        ("a: {description: x, model: {n_head: 5}}\n", "must be divisible by model.n_head"),
        ("a: {description: x, model: {name: bdh, mlp_multiplier: many}}\n",
         "model.mlp_multiplier expects int"),
    ],
)
def test_a_broken_presets_file_is_a_one_line_error_naming_it(tmp_path: Path, text: str,
                                                             expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_presets(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expected in message


def test_every_data_file_of_the_package_ships_in_a_wheel() -> None:
    """setuptools leaves files that are not modules out of a (non-editable) wheel unless
    package-data lists them, and presets.yaml is read at import. ``__pycache__`` holds what
    Python and numba compile at run time, never shipped."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["aura"]
    package = ROOT / "src" / "aura"
    data = [p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.relative_to(package).parts]
    assert "presets.yaml" in data
    for name in data:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_large_gpu_presets_grow_with_the_gpu_and_keep_an_effective_batch_of_128() -> None:
    l4, a40, a80 = (load_config(preset=n) for n in ("l4-24gb", "a100-40gb", "a100-80gb"))
    shapes = [(c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size)
              for c in (l4, a40, a80)]
    assert shapes == [(24, 12, 1536, 1024), (24, 16, 2048, 1024), (40, 20, 2560, 1024)]
    for cfg, micro in ((l4, 4), (a40, 8), (a80, 8)):
        assert cfg.train.batch_size == micro
        assert cfg.train.batch_size * cfg.train.grad_accum == 128
        assert (cfg.train.precision, cfg.train.compile, cfg.train.lr) == ("bf16", True, 1e-4)
        assert cfg.train.grad_checkpoint
    assert a80.train.parallel == "fsdp"  # under torchrun with several GPUs


def test_m1_preset_uses_fp32_and_checkpointing() -> None:
    cfg = load_config(preset="m1-8gb")
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (4, 8)
    assert cfg.train.precision == "fp32" and cfg.train.grad_checkpoint


# --- overrides -------------------------------------------------------------------------------


def test_set_overrides_preset_and_later_set_wins() -> None:
    cfg = load_config(preset="demo", overrides=["train.lr=1e-2", "train.lr=3e-4"])
    assert cfg.train.lr == 3e-4
    assert cfg.model.n_layer == 4  # untouched preset value survives


def test_overrides_are_validated_together_not_one_by_one() -> None:
    cfg = load_config(preset="demo", overrides=["model.n_head=6", "model.n_embd=384"])
    assert (cfg.model.n_head, cfg.model.n_embd) == (6, 384)


def test_apply_overrides_returns_a_new_config_and_leaves_the_old_alone() -> None:
    old = load_config(overrides=["data.curriculum=[[0,64]]"])
    new = apply_overrides(old, {"train.lr": "3e-4"})
    new.data.curriculum.append([10, 128])
    assert old.train.lr == 1e-3 and new.train.lr == 3e-4
    assert old.data.curriculum == [[0, 64]]


def test_float_from_string() -> None:
    assert load_config(overrides=["train.lr=3e-4"]).train.lr == 3e-4
    assert isinstance(load_config(overrides=["train.beta1=0"]).train.beta1, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("True", True), ("YES", True), ("1", True),
     ("false", False), ("No", False), ("0", False)],
)
def test_bool_parsing(text: str, expected: bool) -> None:
    assert load_config(overrides=[f"train.compile={text}"]).train.compile is expected


def test_int_parsing() -> None:
    assert load_config(overrides=["train.max_steps=1e5"]).train.max_steps == 100_000
    assert apply_overrides(AuraConfig(), {"train.max_steps": 300.0}).train.max_steps == 300


@pytest.mark.parametrize(("text", "expected"), [("none", None), ("Null", None), ("50304", 50304)])
def test_optional_int(text: str, expected: int | None) -> None:
    assert load_config(overrides=[f"model.vocab_size={text}"]).model.vocab_size == expected


def test_curriculum_parsing() -> None:
    cfg = load_config(preset="demo", overrides=["data.curriculum=[[0,32],[500,64]]"])
    assert cfg.data.curriculum == [[0, 32], [500, 64]]


def test_literal_accepts_a_choice() -> None:
    assert load_config(overrides=["train.schedule=plateau"]).train.schedule == "plateau"


# --- YAML files ------------------------------------------------------------------------------


def test_yaml_preset_then_sections_then_set(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "preset: cpu-small\n"
        "model: {n_layer: 2, bias: yes}\n"
        "data: {curriculum: [[0, 64], [100, 256]]}\n"
        "train: {lr: 3e-4, precision: bf16, batch_size: 4}\n",
    )
    cfg = load_config(config_file=str(path), overrides=["train.batch_size=2"])
    assert cfg.model.n_layer == 2 and cfg.model.bias is True
    assert cfg.model.n_embd == 384  # from the preset
    assert cfg.data.curriculum == [[0, 64], [100, 256]]
    assert cfg.train.lr == 3e-4 and cfg.train.precision == "bf16"
    assert cfg.train.batch_size == 2


CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


def test_configs_directory_has_examples() -> None:
    assert len(CONFIG_FILES) >= 2


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = load_config(config_file=str(path))
    assert tree["preset"] in PRESETS
    assert cfg.model.n_embd % cfg.model.n_head == 0
    assert cfg != load_config(preset=tree["preset"])  # the file changes something


# --- round trips -----------------------------------------------------------------------------


@st.composite
def configs(draw: st.DrawFn) -> AuraConfig:
    n_head = draw(st.integers(1, 8))
    block = draw(st.integers(8, 512))
    steps = draw(st.lists(st.integers(0, 10_000), max_size=3, unique=True).map(sorted))
    precision = draw(st.sampled_from(["auto", "fp32", "bf16", "fp16"]))
    weights = draw(st.sampled_from(["fp32", "bf16"])) if precision == "bf16" else "fp32"
    return apply_overrides(
        load_config(preset=draw(st.sampled_from(list(PRESETS)))),
        {
            "model.n_head": n_head,
            "model.n_embd": n_head * 2 * draw(st.integers(3, 32)),  # theta-gamma: even, >= 6
            "model.block_size": block,
            "model.vocab_size": draw(st.none() | st.integers(1, 100_000)),
            "model.dropout": draw(st.floats(0, 0.99)),
            "data.curriculum": [[s, draw(st.integers(1, block))] for s in steps],
            "train.lr": draw(st.floats(1e-8, 10)),
            "train.precision": precision,
            "train.weights": weights,  # bf16 weights need bf16 compute
            "train.compile": draw(st.booleans()),
        },
    )


@settings(max_examples=40, deadline=None)
@given(configs())
def test_dict_round_trip(cfg: AuraConfig) -> None:
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(data) == cfg


@settings(max_examples=40, deadline=None)
@given(configs())
def test_yaml_round_trip(cfg: AuraConfig) -> None:
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=1e-12, max_value=1e3))
def test_any_positive_lr_string_parses_exactly(lr: float) -> None:
    assert load_config(overrides=[f"train.lr={lr!r}"]).train.lr == lr


def test_config_from_dict_fills_missing_keys_and_rejects_unknown_ones() -> None:
    cfg = config_from_dict({"model": {"n_layer": 3}})
    assert cfg.model.n_layer == 3 and cfg.train == AuraConfig().train
    with pytest.raises(ConfigError, match=re.escape("did you mean 'model.n_layer'")):
        config_from_dict({"model": {"n_layers": 3}})
    with pytest.raises(ConfigError, match=re.escape("train.lr expects float")):
        config_from_dict({"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="mapping"):
        config_from_dict([1, 2])  # type: ignore[arg-type]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (["trian.lr=1"], "did you mean 'train.lr'"),
        (["lr=1"], "did you mean 'train.lr'"),
        (["train.lr=abc"], "train.lr expects float, got 'abc'"),
        (["train.lr=inf"], "train.lr expects float"),
        (["train.batch_size=1.5"], "train.batch_size expects int, got '1.5'"),
        (["model.bias=maybe"], "model.bias expects bool"),
        (["model.vocab_size=many"], "model.vocab_size expects int | None"),
        (
            ["train.precision=fp8"],
            "train.precision must be one of auto, fp32, bf16, fp16, got 'fp8'",
        ),
        (["train.lr"], "KEY=VALUE"),
        (["=3"], "KEY=VALUE"),
        (["data.curriculum=[[0,"], "data.curriculum expects list[list[int]]"),
        (["data.curriculum=[[0,64,1]]"], "data.curriculum[0] must be a [from_step, block_size]"),
        (["data.curriculum=[[5,64],[5,128]]"], "data.curriculum[1] from_step"),
        (["data.curriculum=[[0,9999]]"], "data.curriculum[0] block_size"),
        (["data.curriculum=[[0,'x']]"], "data.curriculum[0][1] expects int"),
        (["model.n_head=5"], "model.n_embd (384) must be divisible by model.n_head (5)"),
        (["train.lr=0"], "train.lr must be > 0"),
        (["train.lr=-1e-3"], "train.lr must be > 0"),
        (["model.dropout=1"], "model.dropout must be in [0, 1)"),
        (["train.min_lr_ratio=1.5"], "train.min_lr_ratio must be in [0, 1]"),
        (["train.batch_size=0"], "train.batch_size must be > 0"),
        (["model.block_size=1000000000000000000000000000000"],
         "model.block_size must be below 2**31"),
        (["train.max_steps=-1"], "train.max_steps must be > 0"),
        (["data.dir="], "data.dir must not be empty"),
    ],
)
def test_bad_override_is_a_one_line_error(overrides: list[str], expected: str) -> None:
    assert expected in _error(overrides=overrides)


def test_unknown_key_lists_the_sections_keys() -> None:
    message = _error(overrides=["train.lrr=1"])
    assert "valid keys: train.batch_size, train.block_size, train.grad_accum" in message
    assert "model.n_layer" not in message
    assert "valid sections: model, data, train" in _error(overrides=["trian.lr=1"])


def test_python_values_are_checked_like_strings() -> None:
    with pytest.raises(ConfigError, match=re.escape("train.batch_size expects int, got True")):
        apply_overrides(AuraConfig(), {"train.batch_size": True})
    with pytest.raises(ConfigError, match=re.escape("train.lr expects float, got False")):
        apply_overrides(AuraConfig(), {"train.lr": False})
    with pytest.raises(ConfigError, match=re.escape("data.dir expects str, got 3")):
        apply_overrides(AuraConfig(), {"data.dir": 3})


def test_unknown_preset_suggests_the_closest() -> None:
    message = _error(preset="dmeo")
    assert "did you mean 'demo'" in message and "a100-80gb" in message


def test_preset_and_file_together_is_an_error(tmp_path: Path) -> None:
    assert "not both" in _error(preset="demo", config_file=str(_write(tmp_path, "{}")))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [unclosed\n", "invalid YAML"),
        ("- 1\n- 2\n", "top level must be a mapping"),
        ("", "top level must be a mapping"),
        ("train: 5\n", "section 'train' must be a mapping"),
        ("train:\n  lrr: 1\n", "did you mean 'train.lr'"),
        ("preset: dmeo\n", "did you mean 'demo'"),
        ("preset: [demo]\n", "preset must be a preset name"),
        ("lr: 1\n", "did you mean 'train.lr'"),
    ],
)
def test_bad_yaml_file_error_names_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    message = _error(config_file=str(path))
    assert str(path) in message and expected in message


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert str(missing) in _error(config_file=str(missing))
    assert str(tmp_path) in _error(config_file=str(tmp_path))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    assert str(binary) in _error(config_file=str(binary))


# --- CLI -------------------------------------------------------------------------------------


def test_cli_show_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--preset", "demo", "--set", "train.lr=3e-4", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["lr"] == 3e-4
    assert shown["model"]["n_layer"] == 4


def test_cli_show_yaml_reads_back(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--preset", "gpu-4gb"]) == 0
    assert config_from_dict(yaml.safe_load(capsys.readouterr().out)) == load_config(
        preset="gpu-4gb"
    )


def test_cli_bad_key_is_one_stderr_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--set", "train.lrr=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "did you mean" in lines[0]


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    assert main(["config", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == {name: p.description for name, p in PRESETS.items()}


# --- field docs and --explain ----------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [DataConfig, TrainConfig, *(model_config_class(name) for name in model_names())],
    ids=lambda cls: cls.__name__,
)
def test_every_config_field_has_a_docstring(cls: type) -> None:
    docs = field_docs(cls)
    assert list(docs) == [f.name for f in dataclasses.fields(cls)]
    assert [name for name, doc in docs.items() if not doc.strip()] == []


@dataclass
class _Base:
    plain: int = 0
    """The base's
    two-line doc."""
    redefined: int = 1
    """The base's doc."""
    undocumented: int = 2


@dataclass
class _Derived(_Base):
    redefined: int = 3
    """The subclass's own doc."""
    added: str = "x"  # a trailing comment is not a docstring
    inherited_only: bool = False


def test_field_docs_walk_the_mro_and_the_most_derived_doc_wins() -> None:
    assert field_docs(_Derived) == {
        "plain": "The base's two-line doc.",
        "redefined": "The subclass's own doc.",
        "undocumented": "",
        "added": "",
        "inherited_only": "",
    }
    assert field_docs(_Base)["redefined"] == "The base's doc."


def test_explain_documents_model_keys_by_the_resolved_model_class() -> None:
    explained = explain_config(load_config(preset="bdh-cpu"))
    flat = {f"{s}.{k}": v for s, values in config_to_dict(load_config(preset="bdh-cpu")).items()
            for k, v in values.items()}
    assert list(explained) == list(flat)
    assert {key: entry["value"] for key, entry in explained.items()} == flat
    assert explained["model.mlp_multiplier"] == {
        "value": 16, "doc": field_docs(model_config_class("bdh"))["mlp_multiplier"]}
    assert "reference is byte-level" in explained["model.vocab_size"]["doc"]  # bdh's own doc
    assert explained["model.n_embd"]["doc"] != field_docs(ModelConfig)["n_embd"]
    assert "model.mlp_multiplier" not in explain_config(load_config(preset="demo"))


def test_cli_explain_prints_each_key_settable_with_its_doc(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--preset", "bdh-cpu", "--set", "train.lr=3e-4",
                 "--explain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    settings_lines = [line for line in lines if not line.startswith(" ")]
    cfg = load_config(preset="bdh-cpu", overrides=["train.lr=3e-4"])
    i = lines.index("model.mlp_multiplier=16")
    assert lines[i + 1].startswith("    Sets the neurons per head")
    explained = explain_config(cfg)
    assert settings_lines == [f"{k}={override_text(e['value'])}" for k, e in explained.items()]
    assert "train.lr=0.0003" in lines and "data.curriculum=[]" in lines
    assert all(len(line) <= 100 for line in lines)
    assert main(["config", "show", "--preset", "bdh-cpu", "--explain", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model.mlp_multiplier"]["value"] == 16
    assert shown == json.loads(json.dumps(explain_config(load_config(preset="bdh-cpu"))))


@settings(max_examples=30, deadline=None)
@given(configs())
def test_explained_settings_type_back_as_the_same_config(cfg: AuraConfig) -> None:
    """Each KEY=VALUE line of --explain, given back as --set, rebuilds the config exactly."""
    typed = [f"{key}={override_text(entry['value'])}" for key, entry in explain_config(cfg).items()]
    assert load_config(overrides=typed) == cfg
