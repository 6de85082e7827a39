"""A real Distribution v2 registry (Debian's ``docker-registry``) on 127.0.0.1 for tests.

Started on a free loopback port with a temporary config and storage directory, stopped (and
its files removed) on exit. Plain HTTP, so clients pass ``--tls-verify=false``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["LocalRegistry", "local_registry", "push"]


@dataclass(frozen=True)
class LocalRegistry:
    host: str
    storage: Path

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to corrupt it in a test)."""
        hex_ = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def local_registry(timeout: float = 20.0) -> Iterator[LocalRegistry]:
    """Run ``docker-registry serve`` on 127.0.0.1:<free port> until the block ends.

    Raises:
        RuntimeError: the binary is missing or the registry did not answer in time.
    """
    binary = shutil.which("docker-registry")
    if binary is None:
        raise RuntimeError("docker-registry is not installed (run scripts/setup)")
    work = Path(tempfile.mkdtemp(prefix="vc-registry-"))
    port = _free_port()
    storage = work / "storage"
    storage.mkdir()
    config = work / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(work / "registry.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [binary, "serve", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"docker-registry did not start: {(work / 'registry.log').read_text()[-2000:]}"
                )
            time.sleep(0.05)
        yield LocalRegistry(f"127.0.0.1:{port}", storage)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def push(layout: Path, tag: str, dest: str) -> None:
    """``skopeo copy oci:LAYOUT:TAG docker://DEST`` over plain HTTP, keeping the OCI manifest."""
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
         f"oci:{layout}:{tag}", f"docker://{dest}"],
        check=True, capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
