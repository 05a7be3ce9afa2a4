"""Unit tests of configuration: sources, precedence, llmlb fallbacks and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelfs.config import Config, ConfigError, load, parse_size


def test_defaults() -> None:
    config = load({}, None, {})
    assert config.shared == () and config.router == () and config.router_token is None
    assert config.shared_timeout == 2.0 and config.read_timeout == 30.0 and config.retries == 3
    assert config.store.is_absolute()


def test_precedence_flags_over_env_over_file_over_llmlb(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text('store = "/file/store"\nshared = ["/file/a", "/file/b"]\nrouter = ["http://file:1"]\n'
                    "retries = 7\nshared_timeout = 4.5\n")
    env = {"MODELFS_SHARED": "/env/a,/env/b", "MODELFS_RETRIES": "5", "LLM_NODE_MODELS_DIR": "/llm/store",
           "LLM_ROUTER_URL": "http://llm:2", "LLM_NODE_API_KEY": "key"}
    config = load({"retries": 9, "store": None}, file, env)
    assert config.store == Path("/file/store")  # file beats the llmlb fallback
    assert config.shared == (Path("/env/a"), Path("/env/b"))  # env beats file
    assert config.router == ("http://file:1",)
    assert config.retries == 9  # flag beats env
    assert config.shared_timeout == 4.5
    assert config.router_token == "key"  # llmlb fallback when nothing else sets it


def test_llmlb_variables_are_fallbacks() -> None:
    env = {"LLM_NODE_MODELS_DIR": "/m", "LLM_NODE_SHARED_MODELS_DIR": "/nfs", "LLM_ROUTER_URL": "http://r:8080/"}
    config = load({}, None, env)
    assert config.store == Path("/m") and config.shared == (Path("/nfs"),) and config.router == ("http://r:8080",)


@pytest.mark.parametrize(
    "source, message",
    [
        ({"MODELFS_SHARED_TIMEOUT": "-1"}, "MODELFS_SHARED_TIMEOUT"),
        ({"MODELFS_ROUTER": "ftp://x"}, "MODELFS_ROUTER"),
        ({"MODELFS_RETRIES": "many"}, "MODELFS_RETRIES"),
        ({"MODELFS_ALLOW_OTHER": "perhaps"}, "MODELFS_ALLOW_OTHER"),
        ({"MODELFS_STORE_MAX_SIZE": "lots"}, "MODELFS_STORE_MAX_SIZE"),
    ],
)
def test_bad_env_values_name_the_variable(source: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load({}, None, source)


def test_bad_file_names_the_key(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("auto_repair = true\n")
    with pytest.raises(ConfigError, match="auto_repair"):
        load({}, file, {})
    file.write_text("shared_timeout = 'soon'\n")
    with pytest.raises(ConfigError, match="shared_timeout"):
        load({}, file, {})
    file.write_text("store = [\n")
    with pytest.raises(ConfigError, match=str(file)):
        load({}, file, {})
    with pytest.raises(ConfigError, match="cannot read"):
        load({}, tmp_path / "missing.toml", {})


def test_sizes() -> None:
    assert parse_size("200G") == 200 << 30
    assert parse_size("1.5T") == int(1.5 * (1 << 40))
    assert parse_size("500MiB") == 500 << 20
    assert parse_size("1024") == 1024
    assert parse_size("0") is None


def test_token_is_not_in_repr() -> None:
    assert "sekrit" not in repr(Config(router_token="sekrit"))


def test_auto_repair_variables_are_silently_ignored(tmp_path: Path) -> None:
    env = {"LLM_NODE_AUTO_REPAIR": "1", "LLM_AUTO_REPAIR": "true", "LLM_NODE_REPAIR_TIMEOUT_SECS": "30",
           "LLM_REPAIR_TIMEOUT_SECS": "30", "PATH": "/usr/bin:/bin"}
    load({}, None, env)
    # The real command prints nothing about them either (it fails later, on the missing mountpoint).
    result = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(tmp_path / "nope"), "--foreground",
                             "--store", str(tmp_path / "store")], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "AUTO_REPAIR" not in output and "REPAIR_TIMEOUT" not in output and "WARNING" not in output
    assert "does not exist" in result.stderr


def test_cli_reports_config_errors_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(tmp_path), "--shared-timeout", "0"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "shared_timeout" in result.stderr
