"""One sandbox: a VM (through a Hypervisor driver) plus its guest agent.

This first cut boots, runs commands and stops; persistence and reattach come with the
Sandbox API work (see docs/status.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from types import TracebackType

from virtcontainers.agent.client import AgentClient, ExecProcess
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import SerialPort
from virtcontainers.errors import AgentError, UnsupportedError
from virtcontainers.hypervisor import Hypervisor, HypervisorType, NetworkNamespace, new_hypervisor

__all__ = ["Sandbox"]

#: How long the guest may take from VMM start to an answering agent (TCG boots in ~3 s).
AGENT_READY_TIMEOUT = 60.0


class Sandbox:
    """``async with Sandbox(id, config) as sb: await sb.exec_stream([...])``."""

    def __init__(
        self, id: str, config: HypervisorConfig, hypervisor: HypervisorType | str = "qemu"
    ) -> None:
        self.id = id
        self.config = config
        self.hypervisor: Hypervisor = new_hypervisor(hypervisor)
        self._agent: AgentClient | None = None

    async def start(self, timeout: float = AGENT_READY_TIMEOUT) -> None:
        """Boot the VM and wait until the guest agent answers a ping.

        Raises:
            ConfigError: bad config. LaunchError / HypervisorTimeout: the VMM failed.
            AgentError: the agent never answered within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        await self.hypervisor.create_sandbox(self.id, NetworkNamespace(), self.config)
        await self.hypervisor.start_sandbox(timeout)
        channel = await self.hypervisor.generate_socket(self.id)
        if not isinstance(channel, SerialPort):
            raise UnsupportedError(f"agent channel {type(channel).__name__}", driver="sandbox")
        self._agent = await AgentClient.connect_unix(channel.host_path)
        while True:
            try:
                await self._agent.ping(timeout=0.5)
                return
            except AgentError:
                if time.monotonic() >= deadline:
                    raise AgentError(
                        f"the guest agent did not answer within {timeout:g} s"
                    ) from None
                await asyncio.sleep(0.05)

    @property
    def agent(self) -> AgentClient:
        if self._agent is None:
            raise AgentError("the sandbox is not started")
        return self._agent

    async def exec_stream(self, argv: Sequence[str], *, tty: bool = False) -> ExecProcess:
        """Start ``argv`` in the guest; iterate the result for output chunks."""
        return await self.agent.exec_stream(list(argv), tty=tty)

    async def stop(self) -> None:
        """Ask the guest to power off (so the console log is complete), then stop the VM."""
        agent, self._agent = self._agent, None
        wait_only = False
        if agent is not None:
            with contextlib.suppress(AgentError):
                await agent.shutdown(timeout=5.0)
                wait_only = True
            await agent.close()
        await self.hypervisor.stop_sandbox(wait_only=wait_only)
        await self.hypervisor.cleanup()

    async def __aenter__(self) -> Sandbox:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
