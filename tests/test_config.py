"""Config: TOML + BACKUPD_SECTION__KEY overrides; errors name the key and never show secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from backupd.config import DEFAULT_CONFIG_PATH, load_config, parse_size
from backupd.errors import ConfigError

TOML = """\
[database]
url = "postgresql+psycopg://backupd:hunter2-db-secret@db.internal/backupd"
[kubelet]
url = "https://10.0.0.5:10250"
timeout_seconds = 300
node_name = "node-a"
[daemon]
max_concurrent_checkpoints = 3
min_free_space = "2Gi"
[[backends]]
name = "local"
type = "filesystem"
path = "/var/backups/backupd"
[[backends]]
name = "s3"
type = "s3"
bucket = "checkpoints"
prefix = "prod"
region = "eu-west-1"
secret_access_key = "AKIA-very-secret-value"
part_size = "16Mi"
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("BACKUPD_CONFIG", "BACKUPD_KUBELET__TIMEOUT_SECONDS", "NODE_NAME"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "config.toml"
    path.write_text(TOML)
    return path


def test_file_values(config_file: Path) -> None:
    c = load_config(config_file)
    assert c.kubelet.timeout_seconds == 300 and c.kubelet.node() == "node-a"
    assert c.daemon.min_free_space == 2 * 2**30
    assert [b.name for b in c.backends] == ["local", "s3"]
    assert c.backend("s3").part_size == 16 * 2**20
    assert c.database.safe_url() == "postgresql+psycopg://backupd:***@db.internal/backupd"


def test_env_overrides_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKUPD_KUBELET__TIMEOUT_SECONDS", "45")
    monkeypatch.setenv("BACKUPD_DATABASE__URL", "sqlite:////tmp/x.db")
    monkeypatch.setenv("BACKUPD_CONFIG", str(config_file))
    c = load_config()
    assert c.kubelet.timeout_seconds == 45
    assert c.kubelet.url == "https://10.0.0.5:10250"  # untouched keys of the same section stay
    assert c.database.url == "sqlite:////tmp/x.db"


def test_unknown_keys_and_wrong_types_name_the_key(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file.write_text(TOML.replace('node_name = "node-a"', 'node_name = "node-a"\nnode_nmae = "typo"')
                           .replace("max_concurrent_checkpoints = 3", 'max_concurrent_checkpoints = "many"'))
    monkeypatch.setenv("BACKUPD_DAEMON__BOGUS", "1")
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    msg = str(info.value)
    assert "kubelet.node_nmae: unknown key" in msg
    assert "daemon.max_concurrent_checkpoints: Input should be a valid integer" in msg and "'many'" in msg
    assert "daemon.bogus: unknown key" in msg


def test_secrets_never_in_errors_or_repr(config_file: Path) -> None:
    config_file.write_text(TOML.replace('part_size = "16Mi"', 'part_size = "lots"'))
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    assert "AKIA-very-secret-value" not in str(info.value)
    assert "hunter2-db-secret" not in str(info.value)
    assert "'lots'" in str(info.value)
    c = load_config(_write(config_file, TOML))
    assert "AKIA-very-secret-value" not in repr(c) and "AKIA-very-secret-value" not in str(c.model_dump())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_secret_from_file(config_file: Path, tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-a-file\n")
    _write(config_file, TOML.replace('secret_access_key = "AKIA-very-secret-value"',
                                     f'secret_access_key_file = "{tmp_path / "key"}"'))
    assert load_config(config_file).backend("s3").credentials() == (None, "from-a-file")


def test_http_kubelet_url_refused(config_file: Path) -> None:
    _write(config_file, TOML.replace("https://10.0.0.5", "http://10.0.0.5"))
    with pytest.raises(ConfigError, match="kubelet.url: .*HTTPS"):
        load_config(config_file)


def test_duplicate_backend_names(config_file: Path) -> None:
    _write(config_file, TOML.replace('name = "s3"', 'name = "local"'))
    with pytest.raises(ConfigError, match="repeated: local"):
        load_config(config_file)


def test_missing_explicit_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = _write(tmp_path / "bad.toml", "[database\nurl=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_unknown_backend_lookup(config_file: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backend 'gcs' \\(configured: local, s3\\)"):
        load_config(config_file).backend("gcs")


@pytest.mark.parametrize(("text", "value"), [("512Mi", 512 * 2**20), ("50Gi", 50 * 2**30), ("1000", 1000),
                                             ("2G", 2 * 10**9), (7, 7)])
def test_sizes(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-1", "1.5Gi", "5Xi"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_unknown_backupd_variables_are_errors_naming_them(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKUPD_DATABSE__URL", "sqlite:////tmp/typo.db")
    monkeypatch.setenv("BACKUPD_KUBELET_URL", "https://10.0.0.9:10250")
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    msg = str(info.value)
    assert "BACKUPD_DATABSE__URL: unknown variable: no config section 'databse'" in msg
    assert "BACKUPD_KUBELET_URL: unknown variable: did you mean BACKUPD_KUBELET__URL?" in msg


def test_backupd_variables_that_are_not_config_are_allowed(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BACKUPD_AGE_IDENTITY_FILE", "BACKUPD_REGISTRY_PASSWORD", "BACKUPD_TEST_FAULTS",
                 "BACKUPD_TEST_ANYTHING", "BACKUPD_REQUIRE_POSTGRES", "BACKUPD_FUZZ_EXAMPLES", "BACKUPD_SHARED_DIR"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("BACKUPD_CONFIG", str(config_file))
    assert load_config().kubelet.node_name == "node-a"


def test_a_whole_section_as_json_in_the_environment(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKUPD_BACKENDS", '[{"name": "env", "type": "filesystem", "path": "/srv/backups"}]')
    assert [(b.name, str(b.path)) for b in load_config(config_file).backends] == [("env", "/srv/backups")]
    monkeypatch.setenv("BACKUPD_BACKENDS", '[{"name": "s3", "type": "s3", "secret_access_key": "AKIA-env-secret"')
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    assert "BACKUPD_BACKENDS: not valid JSON (Expecting ',' delimiter at line 1 column" in str(info.value)
    assert "AKIA-env-secret" not in str(info.value)


def test_a_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[kubelet]\nnode_name = "nœud"\n'.encode("latin-1", errors="replace") + b"\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text \(byte \d+ cannot be decoded\)"):
        load_config(bad)


def test_a_toml_syntax_error_says_where(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML: .*\(at line 2, column \d+\)"):
        load_config(_write(tmp_path / "bad.toml", '[database]\nurl = "sqlite:///x.db\n'))


@pytest.mark.parametrize(("replace", "key"), [
    ('path = "/var/backups/backupd"', "backends.0.filesystem.path"),
    ('node_name = "node-a"', "kubelet.ca_file"),
    ('node_name = "node-a"', "kubelet.checkpoint_dir"),
    ('max_concurrent_checkpoints = 3', "daemon.api_token_file"),
])
def test_an_empty_path_setting_is_an_error_not_the_current_directory(config_file: Path, replace: str,
                                                                    key: str) -> None:
    name = key.rsplit(".", 1)[1]
    _write(config_file, TOML.replace(replace, f'{replace}\n{name} = ""' if name != "path" else 'path = ""'))
    with pytest.raises(ConfigError, match=f"{re.escape(key)}: must not be empty"):
        load_config(config_file)


@pytest.mark.skipif(DEFAULT_CONFIG_PATH.exists(), reason=f"{DEFAULT_CONFIG_PATH} exists on this machine")
def test_no_config_file_and_no_catalog_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BACKUPD_CONFIG", "BACKUPD_DATABASE", "BACKUPD_DATABASE__URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="no config file: give --config FILE, set BACKUPD_CONFIG, or create "
                                          "/etc/backupd/config.toml"):
        load_config()
    monkeypatch.setenv("BACKUPD_DATABASE__URL", "sqlite:////tmp/from-env.db")  # configured by environment alone
    assert load_config().database.url == "sqlite:////tmp/from-env.db"


RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"


def _dedup_config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "dedup.toml"
    path.write_text(f'[[backends]]\nname = "local"\ntype = "filesystem"\npath = "{tmp_path}/b"\n{extra}')
    return path


def test_format_defaults_to_full_and_dedup_is_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKUPD_DATABASE__URL", "sqlite:///x.db")
    assert load_config(_dedup_config(tmp_path, "")).backends[0].format == "full"
    assert load_config(_dedup_config(tmp_path, 'format = "dedup"\n')).backends[0].format == "dedup"
    with pytest.raises(ConfigError, match=r"backends\.0\.filesystem\.format"):
        load_config(_dedup_config(tmp_path, 'format = "zip"\n'))


def test_the_repack_threshold_is_a_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKUPD_DATABASE__URL", "sqlite:///x.db")
    assert load_config(_dedup_config(tmp_path, "")).daemon.repack_below_live_share == 0.5
    monkeypatch.setenv("BACKUPD_DAEMON__REPACK_BELOW_LIVE_SHARE", "0")  # never repack
    assert load_config(_dedup_config(tmp_path, "")).daemon.repack_below_live_share == 0
    monkeypatch.setenv("BACKUPD_DAEMON__REPACK_BELOW_LIVE_SHARE", "50")  # a percentage, not a share
    with pytest.raises(ConfigError, match=r"daemon\.repack_below_live_share: Input should be less than or equal to 1"):
        load_config(_dedup_config(tmp_path, ""))


def test_encrypted_dedup_needs_an_id_key_file_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKUPD_DATABASE__URL", "sqlite:///x.db")
    with pytest.raises(ConfigError, match="needs id_key_file"):
        load_config(_dedup_config(tmp_path, f'format = "dedup"\nencryption_recipients = ["{RECIPIENT}"]\n'))
    key = tmp_path / "id-key"
    secret = "ab" * 32
    key.write_text(secret + "\n")
    key.chmod(0o644)
    config = load_config(_dedup_config(
        tmp_path, f'format = "dedup"\nencryption_recipients = ["{RECIPIENT}"]\nid_key_file = "{key}"\n'))
    backend = config.backends[0]
    with pytest.raises(ConfigError, match="readable by others") as exc:
        backend.id_key()
    assert secret not in str(exc.value)
    key.chmod(0o600)
    assert backend.id_key() == bytes.fromhex(secret)
    key.write_text("not hex at all")
    with pytest.raises(ConfigError, match="64 hex digits") as exc:
        backend.id_key()
    assert "not hex" not in str(exc.value)
    with pytest.raises(ConfigError, match="only used with format"):
        load_config(_dedup_config(tmp_path, f'id_key_file = "{key}"\n'))
