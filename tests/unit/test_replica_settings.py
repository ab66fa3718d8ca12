"""Replica and PgBouncer settings, WAL positions and the choice of a replica, without servers."""

import json
from pathlib import Path

import pytest
from sqlalchemy import make_url

from app.core.config import load_settings
from app.db.replicas import Replica, ReplicaSet, WalPosition
from app.errors import ConfigError
from tests.services.postgres_cluster import SHIPPED_PGBOUNCER_INI, bouncer_ini


def write_database_config(folder: Path, database: dict) -> Path:
    (folder / "config").mkdir(parents=True, exist_ok=True)
    (folder / "config" / "database_config.json").write_text(json.dumps({"database": database}))
    return folder


def endpoint(port: int, **password: str) -> dict:
    return {"host": "db", "port": port, "username": "app", "database": "agents", **password}


def test_wal_position_round_trip() -> None:
    position = WalPosition.parse("16/B374D848")

    assert position.offset == (0x16 << 32) | 0xB374D848
    assert str(position) == "16/B374D848"
    assert WalPosition.parse("0/1") < WalPosition.parse("0/10") < WalPosition.parse("1/0")


@pytest.mark.parametrize("text", ["", "16", "16/", "/1", "g/1", "1/2/3", "123456789/0", "16/B374D848 x"])
def test_wal_position_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="not a WAL position"):
        WalPosition.parse(text)


def test_replica_password_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_database_config(
        tmp_path, {"master": endpoint(5432), "read_replicas": [endpoint(5433, password_env="REPLICA_PW")]}
    )
    monkeypatch.setenv("REPLICA_PW", "p@ss/word")

    replica = load_settings(config_dir=folder, environ={}).database.read_replicas[0]

    assert replica.resolved_password() == "p@ss/word"


def test_missing_password_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_database_config(tmp_path, {"master": endpoint(5432, password_env="NOT_SET_ANYWHERE")})
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)

    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE is not set"):
        load_settings(config_dir=folder, environ={})


def test_two_password_sources_rejected(tmp_path: Path) -> None:
    folder = write_database_config(
        tmp_path, {"master": endpoint(5432, password="a-real-one", password_env="DB_PASSWORD")}
    )

    with pytest.raises(ConfigError, match="sets password and password_env; keep one of them"):
        load_settings(config_dir=folder, environ={})


def test_master_password_is_quoted_in_url(tmp_path: Path) -> None:
    folder = write_database_config(tmp_path, {"master": endpoint(5432, password="p@ss/w:rd")})

    url = make_url(load_settings(config_dir=folder, environ={}).database.sqlalchemy_url())

    assert url.password == "p@ss/w:rd"
    assert url.host == "db"


def test_settings_repr_masks_passwords(tmp_path: Path) -> None:
    folder = write_database_config(
        tmp_path,
        {
            "url": "postgresql://app:url-secret@db:5432/agents",
            "read_replicas": [endpoint(5433, password="replica-secret")],
        },
    )

    shown = repr(load_settings(config_dir=folder, environ={}))

    assert "url-secret" not in shown
    assert "replica-secret" not in shown
    assert "postgresql://app:***@db:5432/agents" in shown


def test_replicas_need_postgres(tmp_path: Path) -> None:
    folder = write_database_config(
        tmp_path, {"url": "sqlite:///data/x.db", "read_replicas": [endpoint(5433)]}
    )

    with pytest.raises(ConfigError, match="read_replicas needs a PostgreSQL primary"):
        load_settings(config_dir=folder, environ={})


def test_shipped_pgbouncer_ini_pools_transactions(tmp_path: Path) -> None:
    shipped = SHIPPED_PGBOUNCER_INI.read_text()

    local = bouncer_ini(shipped, server_port=55401, listen_port=55403, folder=tmp_path)

    lines = {
        line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip()
        for line in local.splitlines()
        if "=" in line and not line.startswith(";")
    }
    assert lines["pool_mode"] == "transaction"
    assert lines["max_client_conn"] == "1000"
    assert lines["default_pool_size"] == "20"
    assert lines["listen_port"] == "55403"
    assert lines["*"] == "host=127.0.0.1 port=55401"
    assert lines["auth_file"] == str(tmp_path / "userlist.txt")


def test_candidates_rotate_and_respect_position() -> None:
    first, second, behind = Replica("a", None), Replica("b", None), Replica("c", None)
    replicas = ReplicaSet(
        [first, second, behind], max_lag_seconds=5, check_interval_seconds=1, check_timeout_seconds=1
    )
    for replica, offset in ((first, 100), (second, 100), (behind, 10)):
        replica.in_rotation = True
        replica.replay_position = WalPosition(offset)
    second.in_rotation = False

    picks = [replicas.candidates()[0].name for _ in range(4)]
    after_write = replicas.candidates(WalPosition(50))

    assert picks == ["a", "c", "a", "c"]
    assert [replica.name for replica in after_write] == ["a"]
    assert replicas.candidates(WalPosition(101)) == []


def test_example_database_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = json.loads(
        (Path(__file__).parents[2] / "examples" / "config" / "database_config.json").read_text()
    )
    secret = tmp_path / "db_password"
    secret.write_text("primary-password\n")
    example["database"]["master"]["password_file"] = str(secret)
    monkeypatch.setenv("TORONTO_DB_REPLICA_PASSWORD", "replica-password")

    database = load_settings(
        config_dir=write_database_config(tmp_path, example["database"]), environ={}
    ).database

    assert database.pgbouncer is True
    assert database.read_replicas[0].resolved_password() == "replica-password"
    assert make_url(database.sqlalchemy_url()).password == "primary-password"
