import subprocess
import sys

import pytest
import yaml

from dextra.pipeline.errors import ParamsError
from dextra.pipeline.params import load_params, parse_params
from tests.helpers import REPO


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.dataset == "demo" and params.clip.batch_size > 1


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        ({"clip": {"batch_size": -1}}, "clip.batch_size", "greater than or equal to 2"),
        ({"clip": {"batch_sise": 64}}, "clip.batch_sise", "unknown key"),
        ({"train": {"unet": {"layers_per_block": "two"}}}, "train.unet.layers_per_block", "integer"),
        ({"evaluate": {"guidance_scale": 1000}}, "evaluate.guidance_scale", "less than or equal to 100"),
        ({"device": "tpu"}, "device", "'auto', 'cpu' or 'cuda'"),
        ({"curate": {"distance_percentile": 101}}, "curate.distance_percentile", "less than or equal to 100"),
        ({"export": {"formats": ["hf", "webdataset", "hf"]}}, "export.formats", "names hf more than once"),
    ],
)
def test_bad_value_names_the_field(params_dict, overrides, field, words):
    with pytest.raises(ParamsError) as error:
        parse_params(params_dict(**overrides))
    message = str(error.value)
    assert "\n" not in message
    assert f"{field}:" in message and words in message


def test_missing_section_and_non_mapping(params_dict):
    raw = params_dict()
    del raw["pretrain"]
    with pytest.raises(ParamsError, match="pretrain: required but missing"):
        parse_params(raw)
    with pytest.raises(ParamsError, match="expected a mapping"):
        parse_params(["not", "a", "mapping"])


def test_unreadable_files(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("clip: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_cli_bad_param_exits_2_with_one_line_and_writes_nothing(tmp_path, params_dict):
    raw = params_dict(clip={"batch_size": -1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dextra.pipeline.cli",
            "clip",
            "--params",
            str(tmp_path / "params.yaml"),
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "clip.batch_size" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_help_explains_every_stage():
    from dextra.pipeline.cli import STAGES, build_parser

    text = build_parser().format_help()
    for stage in STAGES:
        assert stage in text
    result = subprocess.run(
        [sys.executable, "-m", "dextra.pipeline.cli", "curate", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "decisions.parquet" in result.stdout


def test_schema_defaults_are_the_values_of_params_yaml():
    """A reader of pipeline/params.py sees the values the project runs with: every default equals params.yaml's."""
    from pydantic import BaseModel

    from dextra.pipeline.params import Params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    differing = []

    def walk(model: type[BaseModel], values: dict, prefix: str) -> None:
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, values.get(name, {}), f"{prefix}{name}.")
            elif not field.is_required() and name in values and field.get_default() != values[name]:
                differing.append(f"{prefix}{name}: schema {field.get_default()!r}, params.yaml {values[name]!r}")

    walk(Params, raw, "")
    assert not differing


def test_a_bare_on_or_off_reads_as_the_word(make_params):
    """DVC rewrites params.yaml after `dvc exp run -S`, leaving on / off bare, which YAML 1.1 reads as booleans."""
    assert make_params(curate={"distance_detector": True}).curate.distance_detector == "on"
    assert make_params(curate={"distance_detector": False}).curate.distance_detector == "off"
