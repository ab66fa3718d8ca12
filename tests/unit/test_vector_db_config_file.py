"""Writing the vector_db section of a configuration file."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.config import ChromaInstance, VectorDbSettings
from app.errors import ConfigError
from app.training.vector_db import write_section


def test_folder_as_config_file_is_rejected(tmp_path: Path) -> None:
    section = VectorDbSettings(provider="chroma", instances=[ChromaInstance(port=18940)])

    with pytest.raises(ConfigError, match="is a folder; give the path of a JSON file"):
        write_section(tmp_path, section)

    assert list(tmp_path.parent.glob("*.json.tmp")) == []
