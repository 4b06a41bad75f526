"""A real S3 API server (moto) on 127.0.0.1 for the storage, output-format and lock tests:
``tests/conftest.py`` starts one per test session (``s3_server``) and makes fresh buckets
(``bucket``). Its credentials' secret is :data:`SECRET`, which tests check never reaches an
output, a log or an error line."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["SECRET", "moto_server"]

SECRET = "tilenet-test-secret-3f9c"


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a random port, the environment pointed at it; yields its
    endpoint URL and restores the environment after."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "tilenet-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
