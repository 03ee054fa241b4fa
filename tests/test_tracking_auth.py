"""`densevse mlflow` lets no one in unauthenticated from elsewhere: a non-loopback --host without --auth is refused
(fast), and with --auth it is MLflow's basic-auth app, which (slow, a real server) answers 401 without a password."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest

from densevse.pipeline.cli.main import main
from densevse.pipeline.serving.rest import is_loopback
from densevse.pipeline.tracking.server import server_command, server_env


def test_non_loopback_host_without_auth_is_refused(tmp_path, capsys):
    assert main(["mlflow", "--host", "0.0.0.0", "--dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0 without authentication" in err and "--auth" in err
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in err and not (tmp_path / "m").exists()  # nothing started or made
    assert [h for h in ("127.0.0.1", "127.8.0.1", "localhost", "::1", "0.0.0.0", "10.0.0.5", "myhost", "::")
            if is_loopback(h)] == ["127.0.0.1", "127.8.0.1", "localhost", "::1"]


def test_bad_artifacts_destination_is_refused(tmp_path, capsys):
    assert main(["mlflow", "--artifacts-destination", "ftp://host/art", "--dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "--artifacts-destination: unsupported URI scheme 'ftp'" in err and not (tmp_path / "m").exists()
    cmd = server_command(tmp_path, artifacts="s3://bucket/art/")
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://bucket/art"  # kept a URI, no trailing '/'


def test_auth_runs_the_basic_auth_app(tmp_path, monkeypatch):
    for var in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_CONFIG_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert "--app-name" not in server_command(tmp_path)  # loopback default: the plain app, as before
    cmd = server_command(tmp_path, "0.0.0.0", 5000, auth=True)
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    env = server_env(tmp_path, auth=True)
    ini = (tmp_path / "basic_auth.ini").read_text()
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str((tmp_path / "basic_auth.ini").resolve())
    assert f"database_uri = sqlite:///{tmp_path.resolve()}/basic_auth.db" in ini and "admin_password" not in ini
    key = tmp_path / "flask_secret_key"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == key.read_text() and key.stat().st_mode & 0o077 == 0
    assert server_env(tmp_path, auth=True)["MLFLOW_FLASK_SERVER_SECRET_KEY"] == key.read_text()  # stable
    custom = tmp_path / "mine.ini"
    assert server_env(tmp_path, auth=True, auth_config=custom)["MLFLOW_AUTH_CONFIG_PATH"] == str(custom.resolve())
    assert "MLFLOW_AUTH_CONFIG_PATH" not in server_env()  # no auth: nothing of it


@pytest.mark.slow
def test_basic_auth_server_refuses_unauthenticated_calls(tmp_path, monkeypatch):
    """A real basic-auth server on 127.0.0.1: the REST API answers 401 without credentials and with a wrong
    password, and serves the admin; /health stays open (start_server waits on it)."""
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth]")
    from densevse.pipeline.tracking.server import start_server, stop_server

    password = "correct-horse-battery"
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", password)
    proc, uri = start_server(tmp_path / "mlflow", auth=True, timeout=600)
    try:
        def call(user_password: str | None) -> int:
            req = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search",
                                         data=json.dumps({"max_results": 10}).encode(),
                                         headers={"Content-Type": "application/json"})
            if user_password:
                req.add_header("Authorization", "Basic " + base64.b64encode(user_password.encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert (call(None), call("admin:wrong-password-123"), call(f"admin:{password}")) == (401, 401, 200)
        # a tracking_uri with the credentials in it works, and they are never logged: params, config file
        from mlflow.tracking import MlflowClient

        from densevse.pipeline.config import load_config
        from densevse.pipeline.tracking.runs import start_run

        authed = uri.replace("http://", f"http://admin:{password}@")
        cfg = load_config("pipeline.yaml", [f"mlflow.tracking_uri={authed}", f"run.output_dir={tmp_path / 'run'}"])
        run_id = start_run(cfg)
        client = MlflowClient(authed)
        params = client.get_run(run_id).data.params
        assert params["mlflow.tracking_uri"] == uri.replace("http://", "http://admin:***@")
        assert not [k for k, v in params.items() if password in v]
        logged = client.download_artifacts(run_id, "config/pipeline.yaml", str(tmp_path))
        text = open(logged).read()
        assert password not in text and "admin:***@" in text
    finally:
        stop_server(proc)


def test_credentials_are_redacted_in_what_is_shared():
    from densevse.pipeline.config import dump_config, load_config, public_config, redact_uri

    assert redact_uri("http://bob:s3cret@mlflow.corp:5000/x?y=1") == "http://bob:***@mlflow.corp:5000/x?y=1"
    assert redact_uri("http://mlflow.corp:5000") == "http://mlflow.corp:5000"
    assert redact_uri("sqlite:///runs/mlflow.db") == "sqlite:///runs/mlflow.db"
    cfg = load_config("pipeline.yaml", ["mlflow.tracking_uri=https://bob:s3cret@mlflow.corp",
                                        "ray.address=ray://u:pw@head:10001"])
    shared = public_config(cfg)
    assert shared["mlflow"]["tracking_uri"] == "https://bob:***@mlflow.corp"
    assert shared["ray"]["address"] == "ray://u:***@head:10001"
    assert "s3cret" not in dump_config(cfg, redact=True) and "s3cret" in dump_config(cfg)  # a job keeps its own
