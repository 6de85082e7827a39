"""The serialized form of a running VM (``to_grpc`` / ``from_grpc``), shared by the drivers.

The reference hands a VM from a cache server to a runtime as a protobuf; here it is JSON with
the driver's persisted :class:`HypervisorState`, the lifecycle state and the VMM argv. The
receiver must be on the same host: it adopts the VMM process by pid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from virtcontainers.errors import HypervisorError
from virtcontainers.hypervisor import VmState
from virtcontainers.persist.hypervisor_state import HypervisorState

__all__ = ["SerializedVm", "decode_vm", "encode_vm"]


@dataclass(frozen=True)
class SerializedVm:
    state: HypervisorState
    vm_state: VmState
    argv: tuple[str, ...] = ()


def encode_vm(state: HypervisorState, vm_state: VmState, argv: Sequence[str] = ()) -> bytes:
    return json.dumps(
        {"state": state.to_dict(), "vm_state": vm_state.value, "argv": list(argv)}
    ).encode()


def decode_vm(data: bytes, *, driver: str) -> SerializedVm:
    """Raises HypervisorError("invalid serialized VM: ...") for anything malformed."""
    try:
        doc = json.loads(data)
        return SerializedVm(
            state=HypervisorState.from_dict(doc["state"]),
            vm_state=VmState(doc["vm_state"]),
            argv=tuple(str(a) for a in doc.get("argv", [])),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HypervisorError(f"invalid serialized VM: {exc}", driver=driver) from exc
