"""Config parsing: precise errors, sizes, the JSON Schema, and `mlxd check`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import ConfigError, json_schema, load_config, parse_config, parse_size

ROOT = Path(__file__).resolve().parent.parent


def errors_of(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "c.yaml")
    return str(e.value)


def test_example_config_is_valid():
    cfg = load_config(ROOT / "config.example.yaml")
    assert cfg.models[0].source == "embedded:smollm2"
    assert cfg.server.host == "127.0.0.1"


def test_error_names_file_line_model_and_field():
    msg = errors_of("models:\n  - name: a\n    source: x\n    engine:\n      max_batch_size: 0\n")
    assert msg.startswith("c.yaml:5: models[0].engine.max_batch_size (model 'a'):")
    assert "greater than or equal to 1" in msg


def test_unknown_field_is_rejected_with_its_line():
    msg = errors_of("models:\n  - name: a\n    source: x\n    engnie: {}\n")
    assert "c.yaml:4: models[0].engnie (model 'a'): Extra inputs are not permitted" in msg


def test_duplicate_alias_points_at_the_second_model():
    msg = errors_of("models:\n  - name: a\n    source: x\n  - name: b\n    source: y\n    aliases: [a]\n")
    assert msg == "c.yaml:4: models[1] (model 'b'): name or alias 'a' is already used by model 'a'"


def test_yaml_syntax_error_has_a_line():
    msg = errors_of("models:\n  - name: a\n    source: [x\n")
    assert msg.startswith("c.yaml:") and "YAML syntax error" in msg


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_sizes_read_naturally():
    assert parse_size("512MB") == 512_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1024) == 1024
    with pytest.raises(ValueError):
        parse_size("lots")
    cfg = parse_config("models:\n  - name: a\n    source: x\n    prefix_cache: {memory_budget: 256MiB}\n")
    assert cfg.models[0].prefix_cache.memory_budget == 256 * 2**20


def test_json_schema_describes_the_fields():
    schema = json_schema()
    text = json.dumps(schema)
    for field in ("max_batch_size", "prefix_cache", "aliases", "kv_bits", "memory_budget"):
        assert field in text
    out = subprocess.run([sys.executable, "-m", "daemon", "schema"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["title"] == "mlxd config"


def test_check_reports_device_blas_and_dtype():
    out = subprocess.run([sys.executable, "-m", "daemon", "check", "config.example.yaml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OK, 2 model(s)" in out.stdout
    assert "blas=" in out.stdout and "dtype=" in out.stdout
    if sys.platform.startswith("linux") and Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0").exists():
        assert "blas=openblas" in out.stdout and "dtype=float32" in out.stdout


def test_check_fails_on_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: a\n")
    out = subprocess.run([sys.executable, "-m", "daemon", "check", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{bad}:2: models[0].source (model 'a'): Field required" in out.stderr


def test_output_format_fields_are_checked(tmp_path):
    assert "c.yaml:4: models[0].tool_parser (model 'a'): unknown tool parser 'qwen9'" in errors_of(
        "models:\n  - name: a\n    source: x\n    tool_parser: qwen9\n")
    assert "models[0].chat_template (model 'a'): chat template file /nope.jinja does not exist" in errors_of(
        "models:\n  - name: a\n    source: x\n    chat_template: /nope.jinja\n")
    assert "models[0].reasoning_parser" in errors_of("models:\n  - name: a\n    source: x\n    reasoning_parser: deep\n")
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    cfg = parse_config(f"models:\n  - name: a\n    source: x\n    chat_template: {tmp_path / 't.jinja'}\n"
                       "    tool_parser: hermes\n    reasoning_parser: think\n")
    other = parse_config("models:\n  - name: a\n    source: x\n")
    assert cfg.models[0].worker_key() != other.models[0].worker_key()     # a new worker applies them


def test_allowed_origins_are_checked(tmp_path):
    cfg = parse_config("server:\n  allowed_origins: ['HTTP://LocalHost:3000/', 'https://app.example:443', '*']\n"
                       "models: [{name: a, source: embedded:smollm2}]\n")
    assert cfg.server.allowed_origins == ("http://localhost:3000", "https://app.example", "*")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  allowed_origins: ['localhost:3000', 'http://a.example/path']\n"
                   "models: [{name: a, source: embedded:smollm2}]\n")
    out = subprocess.run([sys.executable, "-m", "daemon", "check", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "bad.yaml:2: server.allowed_origins[0]" in out.stderr and "not a web origin" in out.stderr, out.stderr
