"""Config strictness (issue 9.2): unknown sections/keys, types and ranges are refused before any work starts."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from negalign.cli import app
from negalign.config import STAGES, SampleConfig, TrainConfig, resolve
from negalign.errors import UsageError

runner = CliRunner()


def _resolve(cls, section, data, flags=None):
    return resolve(cls, section, data, flags or {}, source="cfg.yaml")


def test_unknown_section_suggests_nearest():
    with pytest.raises(UsageError, match=r"unknown section 'sampel' \(did you mean 'sample'\?\)"):
        _resolve(SampleConfig, "sample", {"sampel": {"temperature": 0.5}})


def test_unknown_key_in_section_suggests_nearest():
    with pytest.raises(UsageError, match=r"unknown key 'sample.temprature' \(did you mean 'temperature'\?\)"):
        _resolve(SampleConfig, "sample", {"sample": {"temprature": 0.5}})


def test_unknown_key_in_another_stages_section_is_caught_too():
    with pytest.raises(UsageError, match=r"unknown key 'filter.keep_fractoin'"):
        _resolve(SampleConfig, "sample", {"filter": {"keep_fractoin": 0.5}})


def test_unknown_flat_key_is_refused_but_other_stages_keys_are_allowed():
    cfg = _resolve(SampleConfig, "sample", {"temperature": 0.7, "keep_fraction": 0.5})
    assert cfg.temperature == 0.7
    with pytest.raises(UsageError, match="unknown key 'temperatur'"):
        _resolve(SampleConfig, "sample", {"temperatur": 0.7})


@pytest.mark.parametrize("data, message", [
    ({"temperature": "hot"}, "temperature: expected a number, got 'hot'"),
    ({"num_samples": "four"}, "num_samples: expected a whole number, got 'four'"),
    ({"num_samples": 2.5}, "num_samples: expected a whole number"),
    ({"temperature": -1}, "temperature: must be > 0.0, got -1.0"),
    ({"top_p": 1.5}, "top_p: must be <= 1.0"),
    ({"engine": "vlm"}, "engine: must be one of auto, vllm, hf, got 'vlm' (did you mean 'vllm'?)"),
    ({"greedy": "maybe"}, "greedy: expected true or false"),
    ({"shard_index": 5, "num_shards": 2}, "--shard-index must be in [0, 2), got 5"),
])
def test_bad_values_are_refused(data, message):
    with pytest.raises(UsageError) as e:
        _resolve(SampleConfig, "sample", data)
    assert message in str(e.value)


def test_values_are_converted_to_the_field_type():
    cfg = _resolve(SampleConfig, "sample", {"sample": {"temperature": 1, "num_samples": "4", "greedy": "true"}})
    assert (cfg.temperature, cfg.num_samples, cfg.greedy) == (1.0, 4, True)
    assert isinstance(cfg.temperature, float)


def test_flags_win_over_yaml_and_yaml_over_defaults():
    cfg = _resolve(TrainConfig, "train", {"beta": 0.2, "train": {"beta": 0.3, "epochs": 2}}, {"beta": 0.4})
    assert (cfg.beta, cfg.epochs) == (0.4, 2)


def test_every_config_field_has_help_and_a_cli_flag():
    for stage in STAGES.values():
        result = runner.invoke(app, [stage.name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        for f in dataclasses.fields(stage.config):
            assert f.metadata.get("help"), f"{stage.name}.{f.name} has no help"
            if f.metadata.get("cli", True):
                flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
                assert flag in result.output, f"{stage.name}: {flag} missing from --help"


def test_cli_help_shows_the_dataclass_default():
    result = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "200"})
    assert "[default: 64]" in result.output  # max_tokens, read from SampleConfig


def test_cli_bad_value_exits_2_before_any_work(tmp_path):
    result = runner.invoke(app, ["sample", "--run", str(tmp_path / "r"), "--temperature", "-1"])
    assert result.exit_code == 2
    assert "temperature: must be > 0.0" in result.output
    assert not (tmp_path / "r").exists()


def test_cli_yaml_typo_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sampel:\n  temperature: 0.5\n")
    result = runner.invoke(app, ["sample", "--run", str(tmp_path / "r"), "--config", str(cfg)])
    assert result.exit_code == 2
    assert "did you mean 'sample'" in result.output


# ----------------------------------------------------------------------------------------------- stage declarations

def test_every_stage_is_declared_once_and_its_options_follow():
    """STAGE_IO is the one place: each declared input/output is an option of the stage's config, with the help and
    default the declaration gives; a declared schema passes the store's check of its kind; the store names the
    command from it."""
    import pyarrow as pa

    from negalign import stages, store
    from negalign.schemas import REQUIRED

    assert set(stages.STAGE_IO) == set(STAGES)
    for name, io in stages.STAGE_IO.items():
        fields = {f.name: f for f in dataclasses.fields(STAGES[name].config)}
        assert STAGES[name].config.stage_name == name
        for spec in (*io.inputs, io.output):
            if spec.option is None:
                continue
            assert spec.option in fields, (name, spec.option)
            if spec.help is not None:
                assert fields[spec.option].metadata["help"] == f"{spec.help} [default: {stages.default_text(spec)}]"
        schema = io.output.schema(4) if callable(io.output.schema) else io.output.schema
        if schema is not None and io.output.kind in REQUIRED:
            store.check_schema(schema, io.output.kind, "declared")  # raises when a required column is missing
            assert isinstance(schema, pa.Schema)
    assert store.command_of("prompts") == "prepare" and store.command_of("pair") == "pair"
    assert store.command_of("eval-pref") == "eval-pref"  # not a declared kind: the name itself, as before


def test_default_paths_come_from_the_declaration(tmp_path):
    from negalign.config import EvalConfig, SliceConfig
    from negalign.stages import output_dir, output_dirs, stage_input

    cfg = SampleConfig(run=str(tmp_path))
    assert stage_input(cfg, "prompts") == (tmp_path / "prompts", "prompts")
    assert output_dir(cfg) == tmp_path / "samples"
    assert output_dir(dataclasses.replace(cfg, greedy=True)) == tmp_path / "greedy"
    assert str(output_dir(dataclasses.replace(cfg, out="elsewhere"))) == "elsewhere"
    ev = EvalConfig(run=str(tmp_path), name="sc")
    assert stage_input(ev, "prompts") == (tmp_path / "prompts_test", "prompts")
    assert output_dir(ev) == tmp_path / "eval" / "sc"
    assert output_dir(TrainConfig(run=str(tmp_path), name="m")) == tmp_path / "models" / "m"
    from negalign.config import PrepareConfig

    assert output_dirs(PrepareConfig(run=str(tmp_path), test_fraction=0.2)) == [tmp_path / "prompts",
                                                                                tmp_path / "prompts_test"]
    assert output_dirs(PrepareConfig(run=str(tmp_path))) == [tmp_path / "prompts"]
    assert output_dir(SliceConfig(run=str(tmp_path))) == tmp_path / "prompts"


def test_declared_ranges_are_checked_once_by_validate():
    from negalign.config import EvalConfig, PrepareConfig

    with pytest.raises(UsageError, match="test_fraction: must be < 1.0"):
        _resolve(PrepareConfig, "prepare", {"test_fraction": 1.0})
    with pytest.raises(UsageError, match="bootstrap: must be >= 100"):
        _resolve(EvalConfig, "eval", {"bootstrap": 5})
