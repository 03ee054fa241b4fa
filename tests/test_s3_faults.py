"""Object-store faults, fed for real: a real S3 server (moto_server on 127.0.0.1, fixture s3_server) behind a real
HTTP proxy on 127.0.0.1 that forwards to it, answers S3 error documents on cue (SlowDown, InternalError,
ExpiredToken, AccessDenied), or is shut down (the endpoint down); and the server with no credentials at all.

A missing object is the sample's rejection; every other failure is the storage's: ingest raises it (never a
recorded rejection), the stage call is retried and then the shard's task fails naming the stage, shard, object and
error, so the shard is never finished with its samples rejected (a resume would have skipped it)."""
from __future__ import annotations

import http.client
import logging
import pickle
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from densevse.pipeline.preprocess import run
from densevse.stages.base import INGEST, Reject, SourceUnavailable, empty_row, is_transient
from densevse.stages.fetch import img2dataset_failure, read_object, read_tar_member
from tests.test_table_inputs import _jpeg, write_img2dataset


class _Proxy(BaseHTTPRequestHandler):
    """Forwards every request to the S3 server `upstream`, unless `fault` = (HTTP status, S3 error code): then it
    answers that, as S3 does (an XML error document; none to a HEAD request, which has no body)."""
    upstream = ""
    fault: tuple[int, str] | None = None

    def log_message(self, *args):
        pass

    def _any(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.fault:
            status, code = self.fault
            doc = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected {code}"
                   f"</Message><RequestId>densevse-test</RequestId></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(doc)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(doc)
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        conn.request(self.command, self.path, body, dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection"):
                self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any


@pytest.fixture(scope="module")
def objects(s3_server, tmp_path_factory):
    """s3://bucket/faults/: an image, and an img2dataset shard (tar + parquet), uploaded to the S3 server itself."""
    import boto3

    s3 = boto3.client("s3")
    s3.put_object(Bucket="bucket", Key="faults/a.jpg", Body=_jpeg(1))
    root = write_img2dataset(tmp_path_factory.mktemp("i2d"))
    for name in ("00000.tar", "00000.parquet"):
        s3.put_object(Bucket="bucket", Key=f"faults/i2d/{name}", Body=(root / name).read_bytes())
    return "s3://bucket/faults"


@pytest.fixture
def proxy(s3_server, objects, monkeypatch):
    """boto3 and s3fs pointed at the proxy; yields its handler class (set `.fault`) and the server (shut it down
    for an endpoint that is down). botocore's own retries are off (AWS_MAX_ATTEMPTS=1), so each fault is met at
    once; s3fs's file systems are made afresh, for the new endpoint and again after the test."""
    from s3fs import S3FileSystem

    handler = type("Proxy", (_Proxy,), {"upstream": s3_server.removeprefix("http://"), "fault": None})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://%s:%d" % httpd.server_address)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    S3FileSystem.clear_instance_cache()
    yield handler, httpd
    httpd.shutdown()
    httpd.server_close()
    S3FileSystem.clear_instance_cache()


def _no_credentials(monkeypatch):
    """No credentials anywhere botocore looks: environment, files, a profile, the instance metadata service."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


FAULTS = {  # fault -> the error as s3fs raises it for a HEAD request (s3fs makes OSErrors of S3's answers)
    "SlowDown": "OSError: [Errno 16] Service Unavailable",
    "InternalError": "OSError: [Errno 121] Internal Server Error",
    "ExpiredToken": "OSError: [Errno 22] Bad Request", "AccessDenied": "PermissionError: Forbidden",
    "endpoint down": "EndpointConnectionError: Could not connect to the endpoint URL",
    "no credentials": "NoCredentialsError: Unable to locate credentials"}
STATUS = {"SlowDown": 503, "InternalError": 500, "ExpiredToken": 400, "AccessDenied": 403}


def _inject(fault: str, proxy, monkeypatch):
    handler, httpd = proxy
    if fault == "endpoint down":
        httpd.shutdown()
        httpd.server_close()  # nothing listens on the endpoint's port now
    elif fault == "no credentials":
        _no_credentials(monkeypatch)
    else:
        handler.fault = (STATUS[fault], fault)


def test_the_proxy_serves_and_a_missing_object_is_still_a_rejection(proxy, objects):
    """Without a fault the reads go through the proxy to the server; a missing object is the input's fault."""
    assert read_object(f"{objects}/a.jpg", 2**20) == _jpeg(1)
    assert read_tar_member(f"{objects}/i2d/00000.tar#000000002.jpg", 2**20)[:2] == b"\xff\xd8"
    assert str(img2dataset_failure(f"{objects}/i2d/00000.parquet#000000001")) == \
        "download failed in img2dataset: HTTP Error 404: Not Found"
    rows = [empty_row(key=f"k{i}", shard="train-000000", source=f"{objects}/{name}", captions='["A photo."]')
            for i, name in enumerate(("a.jpg", "gone.jpg"))]
    out = INGEST.get("image_caption")().process(rows)
    assert [r["reject"] for r in out] == ["", f"ingest: missing image file {objects}/gone.jpg"]
    with pytest.raises(Reject, match=r"^missing tar file s3://bucket/faults/i2d/gone\.tar$"):
        read_tar_member(f"{objects}/i2d/gone.tar#x.jpg", 2**20)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_object_store_faults_fail_the_shard_never_reject_its_samples(fault, proxy, objects, monkeypatch, caplog):
    """Each fault, on the object read (HEAD) of every sample: ingest raises SourceUnavailable naming the object
    and the error; no row is recorded as rejected; the stage call is retried, then the shard's task fails with
    stage, shard, object and error. Before: each sample was the rejection "ingest: error <Type>: ..." and the
    shard was written as finished."""
    _inject(fault, proxy, monkeypatch)
    uri = f"{objects}/a.jpg"
    with pytest.raises(SourceUnavailable, match=f"^{re.escape(f'reading {uri}: {FAULTS[fault]}')}") as e:
        read_object(uri, 2**20)
    assert is_transient(e.value) and is_transient(e.value.__cause__)  # the library's own error is classified too
    rows = [empty_row(key=f"k{i}", shard="train-000004", source=uri, captions='["A photo."]') for i in range(3)]
    with pytest.raises(SourceUnavailable):
        INGEST.get("image_caption")().process(rows)
    assert [r["reject"] for r in rows] == ["", "", ""]
    monkeypatch.setattr(run, "RETRY_BACKOFF_S", 0)
    with caplog.at_level(logging.WARNING, logger="densevse.preprocess"), \
            pytest.raises(RuntimeError, match=f"^stage ingest: shard train-000004: SourceUnavailable: "
                                              f"{re.escape(f'reading {uri}: {FAULTS[fault]}')}.* "
                                              rf"\(after {run.RETRY_TRIES} tries\)$"):
        run._run_stage(INGEST.get("image_caption")(), pickle.dumps(rows), batch_size=2)
    assert caplog.text.count("stage ingest: shard train-000004: SourceUnavailable") == run.RETRY_TRIES - 1


@pytest.mark.parametrize("fault", ["InternalError", "ExpiredToken"])
def test_a_fault_while_reading_the_body_names_the_service_error(fault, proxy, objects):
    """The object found (HEAD passes) but its GET failing: S3's error document names the code, which the
    classifier knows without the SourceUnavailable wrapper (ExpiredToken is HTTP 400: a status alone says
    nothing)."""
    handler, _ = proxy

    class GetFails(handler):
        fault = property(lambda self: (STATUS[fault], fault) if self.command == "GET" else None)

    proxy[1].RequestHandlerClass = GetFails
    with pytest.raises(SourceUnavailable, match=f"injected {fault}") as e:
        read_object(f"{objects}/a.jpg", 2**20)
    assert is_transient(e.value.__cause__)


@pytest.mark.parametrize("fault", ["SlowDown", "endpoint down"])
def test_img2dataset_tar_and_parquet_on_a_failing_store_are_raised(fault, proxy, objects, monkeypatch):
    """img2dataset's tar members and its record of failed downloads, read from the object store: a fault is raised
    as SourceUnavailable, not a rejection ("unreadable tar", "missing metadata") of every sample."""
    _inject(fault, proxy, monkeypatch)
    with pytest.raises(SourceUnavailable, match=r"^reading s3://bucket/faults/i2d/00000\.tar: "):
        read_tar_member(f"{objects}/i2d/00000.tar#000000000.jpg", 2**20)
    with pytest.raises(SourceUnavailable, match=r"^reading s3://bucket/faults/i2d/00000\.parquet: "):
        img2dataset_failure(f"{objects}/i2d/00000.parquet#000000001")


def test_corrupt_img2dataset_metadata_is_the_inputs_fault(proxy, objects):
    import boto3

    boto3.client("s3").put_object(Bucket="bucket", Key="faults/i2d/00009.parquet", Body=b"not parquet" * 10)
    reject = img2dataset_failure(f"{objects}/i2d/00009.parquet#000090000")
    assert str(reject).startswith(f"unreadable img2dataset metadata file {objects}/i2d/00009.parquet (")
