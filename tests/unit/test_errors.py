"""dude_dist/errors.py: read_json names the file and, for invalid JSON, line and column."""

from __future__ import annotations

import pytest

from dude_dist.errors import CheckpointError, ConfigError, PlanError, read_json


def test_read_json_returns_the_value(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"step": 3, "x": [1, 2]}', encoding="utf-8")
    assert read_json(path, ConfigError) == {"step": 3, "x": [1, 2]}


def test_invalid_json_names_label_line_and_column(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{\n  "step": 3,\n  "x": ]\n}', encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"^checkpoint c is damaged: meta.json:3: invalid JSON: Expecting value \(column 8\)$"):
        read_json(path, CheckpointError, "checkpoint c is damaged: meta.json")
    with pytest.raises(PlanError, match=rf"^{path}:3: invalid JSON: .* \(column 8\)"):
        read_json(path, PlanError)


def test_missing_and_unreadable_files_are_one_error_of_the_given_class(tmp_path):
    with pytest.raises(ConfigError, match=r"^deepspeed.config_file x.json is missing$"):
        read_json(tmp_path / "x.json", ConfigError, "deepspeed.config_file x.json")
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match=r"cannot be read as UTF-8 \(UnicodeDecodeError"):
        read_json(binary, ConfigError)
    with pytest.raises(ConfigError, match="cannot be read as UTF-8 \\(IsADirectoryError"):
        read_json(tmp_path, ConfigError)
