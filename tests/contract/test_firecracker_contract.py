"""Every request the Firecracker driver can send, and every reply of the simulator,
validated against Firecracker's published API document (``shared/specs/firecracker.yaml``,
Swagger 2.0) with jsonschema.

Traffic is recorded with httpx event hooks while the driver runs full lives against the
simulator: direct and jailed launches, root image and initrd boots, debug and quiet,
cold-plugged drive, rate-limited NIC and vsock; block hot-plug and removal (and a refused
one); pause, snapshot, resume; check; stop.

Swagger schemas allow unknown fields, but Firecracker's deserializer refuses them, so the
validator is made strict (``additionalProperties: false`` on every object with
``properties``): a misspelled field fails here as it would on a real Firecracker.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from tests.behaviour.harness_firecracker import sim_config
from tests.unit.test_firecracker_jailer import fake_jailer
from virtcontainers.devices import BlockDrive, HybridVSock, NetDevice
from virtcontainers.drivers.firecracker import FirecrackerHypervisor
from virtcontainers.errors import ApiError, HypervisorError
from virtcontainers.hypervisor import NetworkNamespace

#: Every operation the driver's code can send (see driver.py and api.py).
DRIVER_OPERATIONS = {
    "describeInstance",  # GET /: API readiness, state polling, check, reattach
    "putLogger",
    "putMetrics",
    "putMachineConfiguration",
    "putGuestBootSource",
    "putGuestDriveByID",  # root image, placeholders, cold drives
    "putGuestNetworkInterfaceByID",
    "putGuestVsock",
    "createSyncAction",  # InstanceStart
    "patchGuestDriveByID",  # hot-plug and unplug
    "patchVm",  # pause / resume
    "createSnapshot",
}


class ContractViolation(AssertionError):
    pass


def _strict(node: Any) -> Any:
    """Firecracker refuses unknown fields: add ``additionalProperties: false``."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


class Contract:
    """The Swagger document, as request and reply checks."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.definitions = _strict(copy.deepcopy(spec["definitions"]))
        self.templates = [
            (re.compile("^" + re.sub(r"\{[^}/]+\}", "([^/]+)", path) + "$"), path)
            for path in spec["paths"]
        ]

    def _validator(self, schema: dict[str, Any]) -> jsonschema.Draft4Validator:
        return jsonschema.Draft4Validator({"allOf": [schema], "definitions": self.definitions})

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any], list[str]]:
        """(path template, operation, path parameter values); raises ContractViolation."""
        for pattern, template in self.templates:
            match = pattern.match(path)
            if match:
                ops = self.spec["paths"][template]
                if method.lower() not in ops:
                    raise ContractViolation(
                        f"{method} is not allowed on {template} (allowed: {sorted(ops)})"
                    )
                return template, ops[method.lower()], list(match.groups())
        raise ContractViolation(f"no path template matches {path}")

    def check_request(self, method: str, path: str, body: object) -> str:
        """Validate one request; returns its operationId."""
        template, op, values = self.operation(method, path)
        params = op.get("parameters", [])
        for param in (p for p in params if p["in"] == "path"):
            if not values or not isinstance(values[0], str) or not values[0]:
                raise ContractViolation(f"{template}: missing path parameter {param['name']}")
        body_params = [p for p in params if p["in"] == "body"]
        if not body_params:
            if body is not None:
                raise ContractViolation(f"{method} {template} takes no body")
            return str(op["operationId"])
        (param,) = body_params
        if body is None:
            if param.get("required"):
                raise ContractViolation(f"{method} {template} requires a body")
            return str(op["operationId"])
        errors = sorted(self._validator(param["schema"]).iter_errors(body), key=str)
        if errors:
            raise ContractViolation(
                f"{method} {path} body {body!r}: " + "; ".join(e.message for e in errors)
            )
        # Firecracker's own rule: the id in the path is the id in the body.
        id_field = {"/drives/{drive_id}": "drive_id", "/network-interfaces/{iface_id}": "iface_id"}
        if (
            template in id_field
            and isinstance(body, dict)
            and body.get(id_field[template]) != values[0]
        ):
            raise ContractViolation(f"{path}: path id differs from the body's")
        return str(op["operationId"])

    def check_reply(self, method: str, path: str, status: int, body: bytes) -> None:
        _, op, _ = self.operation(method, path)
        responses = op["responses"]
        documented = responses.get(status) or responses.get(str(status))
        if documented is None:
            if 200 <= status < 300 or "default" not in responses:
                known = sorted(map(str, responses))
                raise ContractViolation(
                    f"{method} {path}: status {status} is not documented ({known})"
                )
            documented = responses["default"]
        schema = documented.get("schema")
        if schema is None:
            if body.strip():
                raise ContractViolation(f"{method} {path}: {status} must have no body: {body!r}")
            return
        doc = json.loads(body)
        errors = sorted(self._validator(schema).iter_errors(doc), key=str)
        if errors:
            raise ContractViolation(
                f"{method} {path} reply {status} {doc!r}: " + "; ".join(e.message for e in errors)
            )


@dataclass
class Exchange:
    method: str
    path: str
    body: object
    status: int
    reply: bytes


class Recorder:
    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    async def __call__(self, response: httpx.Response) -> None:
        await response.aread()
        request = response.request
        body = json.loads(request.content) if request.content else None
        self.exchanges.append(
            Exchange(request.method, request.url.path, body, response.status_code, response.content)
        )


@pytest.fixture
def contract(shared_dir: Path) -> Contract:
    path = shared_dir / "specs" / "firecracker.yaml"
    if not path.is_file():
        pytest.skip(f"{path} is absent: cannot check the Firecracker API contract")
    return Contract(yaml.safe_load(path.read_text()))


async def _full_life(cfg_dir: Path, *, image: bool, debug: bool, jailed: bool) -> Recorder:
    cfg = sim_config(cfg_dir)
    if image:
        rootfs = cfg_dir / "rootfs.img"
        rootfs.write_bytes(b"\0" * 4096)
        cfg.boot.initrd_path, cfg.boot.image_path = "", str(rootfs)
    if jailed:
        cfg.boot.jailer_path = str(fake_jailer(cfg_dir / "jailer"))
    cfg.debugging.debug = debug
    cfg.network.rx_rate_limiter_max_rate = 10_000_000
    cfg.template.devices_state_path = str(cfg_dir / "vm.state")
    cfg.template.memory_path = str(cfg_dir / "vm.mem")
    disk = cfg_dir / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    rec = Recorder()
    hv = FirecrackerHypervisor(response_hooks=[rec])
    await hv.create_sandbox("contract", NetworkNamespace(), cfg)
    await hv.add_device(BlockDrive(file=str(disk), id="cold0", read_only=True))
    await hv.add_device(
        NetDevice(
            id="eth0", tap_name="tap0", mac="02:fc:00:00:00:01", tx_rate_limiter_max_rate=8000
        )
    )
    await hv.add_device(HybridVSock(uds_path="", port=1024, context_id=3))
    await hv.start_sandbox(timeout=20)
    try:
        await hv.check()
        drive = await hv.hotplug_add_device(BlockDrive(file=str(disk), id="hot0"))
        # Refused by Firecracker (an error reply), or when jailed already by the driver,
        # which cannot link a missing file into the jail.
        with pytest.raises(HypervisorError if jailed else ApiError):
            await hv.hotplug_add_device(BlockDrive(file=str(cfg_dir / "missing"), id="x"))
        await hv.hotplug_remove_device(drive)
        await hv.pause_sandbox()
        await hv.check()
        await hv.save_sandbox()
        await hv.resume_sandbox()
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
    return rec


@pytest.mark.parametrize(
    ("image", "debug", "jailed"),
    [(True, False, False), (False, True, False), (True, True, True)],
    ids=["image-quiet", "initrd-debug", "jailed"],
)
async def test_every_driver_request_and_simulator_reply_matches_the_spec(
    contract: Contract, tmp_path: Path, image: bool, debug: bool, jailed: bool
) -> None:
    rec = await _full_life(tmp_path, image=image, debug=debug, jailed=jailed)
    seen: set[str] = set()
    for ex in rec.exchanges:
        seen.add(contract.check_request(ex.method, ex.path, ex.body))
        contract.check_reply(ex.method, ex.path, ex.status, ex.reply)
    assert seen == DRIVER_OPERATIONS
    # The refused hot-plug produced a documented error reply (checked above) and nothing else
    # did.
    errors = [ex for ex in rec.exchanges if ex.status >= 300]
    assert [(e.method, e.status) for e in errors] == ([] if jailed else [("PATCH", 400)])


# -- the checks can fail -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "why"),
    [
        ("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 512}, "less than the minimum"),
        ("PUT", "/machine-config", {"vcpu_count": 1}, "'mem_size_mib' is a required property"),
        ("PUT", "/drives/d0", {"drive_id": "d0", "path_on_host": "/x"}, "is_root_device"),
        ("PUT", "/drives/d0", {"drive_id": "d1", "is_root_device": False}, "path id differs"),
        ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v", "cid": 3}, "Additional properties"),
        ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v"}, "less than the minimum"),
        ("PATCH", "/vm", {"state": "Stopped"}, "is not one of"),
        ("PUT", "/actions", {"action_type": "Reboot"}, "is not one of"),
        ("PUT", "/actions", None, "requires a body"),
        ("POST", "/vm", {"state": "Paused"}, "not allowed"),
        ("PUT", "/drives", {"drive_id": "d0", "is_root_device": False}, "no path template"),
        (
            "PUT",
            "/network-interfaces/eth0",
            {"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"bandwidth": {}}},
            "'refill_time' is a required property",
        ),
    ],
)
def test_wrong_requests_are_rejected(
    contract: Contract, method: str, path: str, body: object, why: str
) -> None:
    with pytest.raises(ContractViolation, match=re.escape(why)):
        contract.check_request(method, path, body)


@pytest.mark.parametrize(
    ("method", "path", "status", "reply", "why"),
    [
        (
            "GET",
            "/",
            200,
            {"id": "x", "state": "Booting", "vmm_version": "1", "app_name": "F"},
            "is not one of",
        ),
        ("GET", "/", 200, {"id": "x", "state": "Running"}, "is a required property"),
        ("PUT", "/actions", 200, {}, "not documented"),
        ("PUT", "/actions", 204, {"ok": True}, "must have no body"),
        ("PATCH", "/vm", 400, {"fault_message": 3}, "is not of type 'string'"),
    ],
)
def test_wrong_replies_are_rejected(
    contract: Contract, method: str, path: str, status: int, reply: object, why: str
) -> None:
    raw = json.dumps(reply).encode()
    with pytest.raises(ContractViolation, match=re.escape(why)):
        contract.check_reply(method, path, status, raw)


# -- the simulator's own replies, beyond what the driver asks ----------------------------


async def test_simulator_replies_match_the_spec(contract: Contract, tmp_path: Path) -> None:
    """Error replies of the simulator and its GET endpoints, validated like the driver's."""
    cfg = sim_config(tmp_path)
    hv = FirecrackerHypervisor()
    await hv.create_sandbox("sim-replies", NetworkNamespace(), cfg)
    await hv.start_sandbox(timeout=20)
    transport = httpx.HTTPTransport(uds=str(hv.paths.api_socket))
    probes: list[tuple[str, str, object]] = [
        ("GET", "/", None),
        ("GET", "/version", None),
        ("GET", "/machine-config", None),
        ("GET", "/vm/config", None),
        # Pre-boot resources after InstanceStart: 400 with a fault_message.
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256}),
        ("PUT", "/boot-source", {"kernel_image_path": cfg.boot.kernel_path}),
        ("PUT", "/drives/late", {"drive_id": "late", "is_root_device": False}),
        ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/x"}),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ("PUT", "/snapshot/create", {"snapshot_path": "/x", "mem_file_path": "/y"}),
        ("PATCH", "/drives/nope", {"drive_id": "nope"}),
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PATCH", "/vm", {"state": "Resumed"}),
        ("PUT", "/actions", {"action_type": "FlushMetrics"}),
    ]
    try:
        with httpx.Client(transport=transport, base_url="http://localhost") as api:
            for method, path, body in probes:
                reply = api.request(method, path, json=body)
                contract.check_reply(method, path, reply.status_code, reply.content)
                if reply.status_code >= 300:
                    assert reply.json()["fault_message"]
            # Malformed JSON: a documented 400 with a fault message.
            reply = api.put("/actions", content=b"{not json")
            contract.check_reply("PUT", "/actions", reply.status_code, reply.content)
            assert reply.status_code == 400
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
