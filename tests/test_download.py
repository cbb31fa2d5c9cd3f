"""`softfine data download` against a local HTTP server on 127.0.0.1 serving the shared data."""

import functools
import hashlib
import http.server
import shutil
import subprocess
import sys
import threading

import pytest

from softfine.datasets import DATASETS


@pytest.fixture()
def serve():
    servers = []

    def start(directory):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def download(*args):
    return subprocess.run(
        [sys.executable, "-m", "softfine", "data", "download", *map(str, args)],
        capture_output=True,
        text=True,
    )


def test_download_checks_checksums(data_dir, tmp_path, serve):
    mirror = serve(data_dir)
    done = download("weibo", "--mirror", mirror, "--data-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    for split, name in DATASETS["weibo"].files.items():
        got = hashlib.sha256((tmp_path / "weibo" / name).read_bytes()).hexdigest()
        assert got == DATASETS["weibo"].sha256[split]
    # FiNE: only dev exists here; asking for it alone works.
    assert download("fine", "--mirror", mirror, "--data-dir", tmp_path, "--split", "dev").returncode == 0
    assert (tmp_path / "fine" / "dev.json").read_bytes() == (data_dir / "fine" / "dev.json").read_bytes()


def test_tampered_file_is_refused_and_nothing_is_written(data_dir, tmp_path, serve):
    tampered = tmp_path / "mirror"
    shutil.copytree(data_dir / "resume", tampered / "resume")
    with open(tampered / "resume" / "dev.char.bmes", "a", encoding="utf-8") as f:
        f.write("坏 O\n")
    target = tmp_path / "data"
    done = download("resume", "--mirror", serve(tampered), "--data-dir", target, "--split", "dev")
    assert done.returncode == 2
    assert "dev.char.bmes: checksum mismatch" in done.stderr.strip().splitlines()[-1]
    assert not (target / "resume" / "dev.char.bmes").exists()
    assert not list((target / "resume").glob("*.part"))


def test_missing_file_on_the_server_is_a_clear_error(tmp_path, serve):
    done = download(
        "resume", "--mirror", serve(tmp_path), "--data-dir", tmp_path / "data", "--split", "train"
    )
    assert done.returncode == 2
    assert "train.char.bmes: download failed (HTTP Error 404" in done.stderr.strip().splitlines()[-1]
