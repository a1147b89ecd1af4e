"""Config loading: the shipped file, flags over the file, key files and credentials, and a table
of broken files each failing with its own message and exit status 78 (through the real CLI)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from appliance.config import EX_CONFIG, SECRET_MASK, AppConfig, ControlConfig, load_config
from appliance.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "etc" / "appliance.toml"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, **(env or {})})


def test_shipped_file_holds_every_default() -> None:
    config = load_config(str(SHIPPED), {})
    assert dataclasses.replace(config, source_path=None) == AppConfig()
    # Every key of every section appears in the file, set or commented out.
    text = SHIPPED.read_text()
    for cls_fields, section in [(config.engine.model, "model"), (config.server, "server"),
                                (config.logging, "logging"), (config.control, "control")]:
        for f in dataclasses.fields(cls_fields):
            assert f"\n{f.name} = " in text or f"\n# {f.name} = " in text, f"{section}.{f.name} not documented"
    for obj in (config.engine.cache, config.engine.scheduler):
        for f in dataclasses.fields(obj):
            assert f"\n{f.name} = " in text or f"\n# {f.name} = " in text, f"engine.{f.name} not documented"


def test_no_file_and_flags_override_the_file(tmp_path: Path) -> None:
    assert load_config(None, {}) == AppConfig()
    path = tmp_path / "a.toml"
    path.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[engine]\nmax_num_seqs = 8\n')
    config = load_config(str(path), {"server.port": 9100, "server.host": None, "control.mode": "0600"})
    assert (config.server.port, config.server.host, config.engine.scheduler.max_num_seqs) == (9100, "0.0.0.0", 8)
    assert config.control.mode == 0o600
    fp8 = load_config(str(path), {"engine.kv_cache_dtype": "fp8"})
    assert fp8.engine.cache.kv_cache_dtype == "fp8" and AppConfig().engine.cache.kv_cache_dtype == "auto"
    capped = load_config(str(path), {"engine.max_prefill_tokens_with_decodes": 512})
    assert capped.engine.scheduler.max_prefill_tokens_with_decodes == 512
    assert AppConfig().engine.scheduler.max_prefill_tokens_with_decodes == 0
    piecewise = load_config(str(path), {"engine.cuda_graph_piecewise_max_tokens": 0})
    assert piecewise.engine.cuda_graph_piecewise_max_tokens == 0
    assert AppConfig().engine.cuda_graph_piecewise_max_tokens == 8192
    assert config.source_path == str(path)


def test_key_file_and_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "app.key").write_text("sk-from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "batch.key").write_text("sk-from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    path = tmp_path / "c.toml"
    path.write_text(f'[[clients]]\nname = "app"\napi_key_file = "{tmp_path / "app.key"}"\n'
                    '[[clients]]\nname = "batch"\napi_key_file = "batch.key"\ntokens_per_minute = 500\n')
    clients = load_config(str(path), {}).clients
    assert [(c.name, c.api_key) for c in clients] == [("app", "sk-from-file"), ("batch", "sk-from-credential")]
    assert clients[1].tokens_per_minute == 500


BROKEN = [
    # (file body, text the message must contain)
    ("[engine]\nmax_num_seq = 8\n", "engine.max_num_seq: unknown key (did you mean 'max_num_seqs'?)"),
    ("[engine]\nmax_num_seqs = 0\n", "engine.max_num_seqs: expected an integer >= 1, got 0"),
    ("[engine]\nmax_num_seqs = \"8\"\n", "engine.max_num_seqs: expected an integer, got '8'"),
    ("[engine]\ngpu_memory_utilization = 1.5\n", "engine.gpu_memory_utilization: expected a fraction in (0, 1], got 1.5"),
    ("[engine]\nblock_size = 24\n", "engine.block_size: expected a power of two from 1 to 256, got 24"),
    ("[engine]\nkv_cache_dtype = \"fp16\"\n", "engine.kv_cache_dtype: expected one of \"auto\", \"fp8\", got 'fp16'"),
    ("[engine]\nmax_num_seqs = 64\nmax_num_batched_tokens = 32\n",
     "engine.max_num_batched_tokens: expected an integer >= engine.max_num_seqs (64), got 32"),
    ("[engine]\nenable_prefix_caching = \"yes\"\n", "engine.enable_prefix_caching: expected true or false, got 'yes'"),
    ("[engine]\nmax_prefill_tokens_with_decodes = -1\n",
     "engine.max_prefill_tokens_with_decodes: expected an integer >= 0 (0: no cap but engine.max_num_batched_tokens), got -1"),
    ("[engine]\ncuda_graph_piecewise_max_tokens = 8\n",
     "engine.cuda_graph_piecewise_max_tokens: expected 0 (mixed and multi-prompt steps run eager) or an integer >= 16, got 8"),
    ("[model]\ndtype = \"fp8\"\n", "model.dtype: expected one of \"auto\", \"float32\", \"bfloat16\", \"float16\", got 'fp8'"),
    ("[server]\nport = 70000\n", "server.port: expected a port number from 0 to 65535, got 70000"),
    ("[server]\ncors_allow_origins = \"*\"\n", "server.cors_allow_origins: expected a list of strings, got '*'"),
    ("[server]\ndrain_timeout_s = -1\n", "server.drain_timeout_s: expected a number of seconds >= 0, got -1"),
    ("[logging]\nlevel = \"LOUD\"\n", "logging.level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
    ("[control]\nmode = 0o1777\n", "control.mode: expected a permission mode from 0o000 to 0o777, e.g. 0o660, got 1023"),
    ("[control]\nsocket_path = \"/" + "x" * 120 + "\"\n", "control.socket_path: expected a path shorter than 108 bytes"),
    ("[servre]\nport = 1\n", "servre: unknown section (did you mean 'server'?)"),
    ("server = 1\n", "server: expected a table [server], got 1"),
    ("[[clients]]\napi_key = \"k\"\n", "clients[0].name: missing: every client needs a name"),
    ("[[clients]]\nname = \"a\"\n", "clients[0].api_key: missing: set api_key or api_key_file"),
    ("[[clients]]\nname = \"a\"\napi_key = \"k\"\napi_key_file = \"/k\"\n",
     "clients[0].api_key: set api_key or api_key_file, not both"),
    ("[[clients]]\nname = \"a\"\napi_key_file = \"/nonexistent/a.key\"\n",
     "clients[0].api_key_file: expected a readable file holding one API key, cannot read '/nonexistent/a.key'"),
    ("[[clients]]\nname = \"a\"\napi_key = \"k1\"\n[[clients]]\nname = \"a\"\napi_key = \"k2\"\n",
     "clients[1].name: expected a unique name, 'a' is used twice"),
    ("[[clients]]\nname = \"a\"\napi_key = \"k\"\nrequests_per_minute = -5\n",
     "clients[0].requests_per_minute: expected an integer >= 0 (0: unlimited), got -5"),
    ("[[clients]]\nname = \"a\"\napi_key = \"k\"\nrpm = 5\n", "clients[0].rpm: unknown key"),
    ("[server\nport = 1\n", "invalid TOML: "),
]


@pytest.mark.parametrize(("body", "message"), BROKEN, ids=[m.split(":")[0] for _, m in BROKEN])
def test_broken_file_names_file_key_and_expectation(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_every_broken_file_has_its_own_message() -> None:
    assert len({m for _, m in BROKEN}) == len(BROKEN)


def test_cli_config_check_exits_78_with_the_message(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[engine]\nmax_num_seqs = 0\n")
    result = cli("config", "check", str(path))
    assert result.returncode == EX_CONFIG
    assert f"{path}: engine.max_num_seqs: expected an integer >= 1, got 0" in result.stderr
    missing = cli("config", "check", str(tmp_path / "nope.toml"))
    assert missing.returncode == EX_CONFIG and "cannot read the config file" in missing.stderr
    assert cli("config", "check", str(SHIPPED)).returncode == 0


def test_cli_serve_exits_78_before_loading_anything(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[server]\nport = -1\n")
    result = cli("serve", "--config", str(path))
    assert result.returncode == EX_CONFIG
    assert f"{path}: server.port: expected a port number from 0 to 65535, got -1" in result.stderr
    bad_flag = cli("serve", "--set", "engine.block_size=3")
    assert bad_flag.returncode == EX_CONFIG
    assert "command line: engine.block_size: expected a power of two" in bad_flag.stderr


def test_cli_config_show_masks_secrets(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[clients]]\nname = "app"\napi_key = "sk-very-secret"\n[server]\nport = 8123\n')
    result = cli("config", "show", "--config", str(path), "--set", "engine.max_num_seqs=4")
    assert result.returncode == 0, result.stderr
    assert "sk-very-secret" not in result.stdout
    shown = tomllib.loads(result.stdout)
    assert shown["clients"] == [{"name": "app", "api_key": SECRET_MASK, "requests_per_minute": 0,
                                 "tokens_per_minute": 0, "max_concurrent_requests": 0}]
    assert shown["server"]["port"] == 8123 and shown["engine"]["max_num_seqs"] == 4
    assert shown["control"]["mode"] == "0660"
    # What `show` prints is itself a valid config file (with the real key back in).
    (tmp_path / "shown.toml").write_text(result.stdout.replace(SECRET_MASK, "sk-x"))
    assert load_config(str(tmp_path / "shown.toml"), {}).control == ControlConfig()
