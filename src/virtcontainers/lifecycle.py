"""The one lifecycle enum: what a driver's VM is in memory and what a sandbox record says.

It sits at the bottom of the layers (beside ``errors.py``) because the state store persists it
and the drivers, ``sandbox.py`` and ``vc ps`` check it: one enum, never its string values.
"""

from __future__ import annotations

import enum

__all__ = ["VmState"]


class VmState(enum.StrEnum):
    """Lifecycle of one VM. Transitions are guarded; see ``Hypervisor._require``.

    A driver moves NEW → CREATED → RUNNING ⇄ PAUSED → STOPPED, or to FAILED when its VMM
    died or never became ready. A sandbox record holds CREATED, RUNNING, PAUSED, STOPPED
    (stopped on request), FAILED (the boot failed) or EXITED: the VM ended without being
    asked (the guest powered off, the VMM crashed or was killed); the record's ``exit`` says
    how and when. ``vc ps`` shows EXITED for a record still saying RUNNING/PAUSED whose VMM
    is gone with nobody left to record it.
    """

    NEW = "new"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"
    EXITED = "exited"

    @property
    def live(self) -> bool:
        """Whether a VMM should be running (RUNNING or PAUSED)."""
        return self in (VmState.RUNNING, VmState.PAUSED)

    @property
    def ended(self) -> bool:
        """Whether the VM is over for good (STOPPED, FAILED or EXITED)."""
        return self in (VmState.STOPPED, VmState.FAILED, VmState.EXITED)
