"""The per-sandbox shim behind ``vc start``: boots the VM, then logs its console until it exits.

``vc start`` returns as soon as the guest agent answers, but somebody has to keep reading the
console (a chardev socket with no client drops what the guest prints) and to notice the VM's
end. That is this small detached process, as in Kata's shim: it holds neither the QMP socket nor
the agent channel after boot, so other ``vc`` commands can use them.

Run as ``python -m virtcontainers.shim <sandbox id> [--root DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from virtcontainers.persist.store import StateStore
from virtcontainers.process import VmmProcess
from virtcontainers.sandbox import Sandbox


async def serve(sandbox_id: str, store: StateStore) -> int:
    sandbox = await Sandbox.attach(sandbox_id, store=store)
    sandbox.set_owner(os.getpid())
    await sandbox.start(detach=True)
    ready = sandbox.run_dir / "shim.ready"
    ready.touch(mode=0o600)
    pid = sandbox.info().pid
    vmm = VmmProcess.adopt(pid)
    try:
        await vmm.wait(None)
    finally:
        vmm.close()
    # QEMU is gone: drain the console to end-of-file and remove its sockets.
    await sandbox.hypervisor.stop_sandbox()
    ready.unlink(missing_ok=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("sandbox_id")
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(asyncio.run(serve(args.sandbox_id, StateStore(args.root))))


if __name__ == "__main__":
    main()
