from __future__ import annotations

import errno
import json
import multiprocessing
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from msgspec.structs import replace

from virtcontainers.devices import BlockDrive, VhostUserDevice, VhostUserKind
from virtcontainers.errors import StoreError
from virtcontainers.lifecycle import VmState
from virtcontainers.persist import (
    SCHEMA_VERSION,
    Bridge,
    HypervisorState,
    SandboxDocument,
    StateStore,
    default_root,
)
from virtcontainers.persist.records import (
    DeviceRecord,
    ExitRecord,
    GuestRecord,
    ImageConfig,
    ImageRecord,
    NetworkRecord,
    PortRecord,
    SerialChannel,
)

SID = "sb-1"


def make_doc(sandbox_id: str = SID, **changes: object) -> SandboxDocument:
    doc = SandboxDocument(
        id=sandbox_id,
        hypervisor_type="qemu",
        state=VmState.RUNNING,
        created_at=1_700_000_000.25,
        hypervisor=HypervisorState(
            pid=4242,
            type="qemu",
            block_index_map={0: 1, 3: 7},
            uuid="8b5e1c2a-0000-4000-8000-000000000001",
            bridges=(Bridge(id="pci-bridge-0", type="pci", addr=2, device_addr={1: "drive-0"}),),
            hotplugged_vcpus=("cpu-1", "cpu-2"),
            hotplugged_memory=256,
            virtiofsd_pid=4343,
            hotplug_vfio_on_root_bus=True,
            pcie_root_port=2,
            api_socket="/run/vc/sb-1/qmp.sock",
            run_dir="/run/vc/sb-1",
            sandbox_id=sandbox_id,
        ),
        config={"memory_mib": 512, "kernel_params": ["quiet", "panic=1"], "nested": {"a": None}},
        annotations={"io.katacontainers.config.hypervisor.default_vcpus": "2", "note": "ünïcödé"},
        agent=SerialChannel(path="/run/vc/sb-1/agent.sock"),
        devices=(
            DeviceRecord.of(BlockDrive(file="/images/root.erofs", id="vc-image", read_only=True)),
            DeviceRecord.of(
                VhostUserDevice(socket_path="/run/fs.sock", id="fs1", type=VhostUserKind.FS)
            ),
        ),
        hotplugged=(DeviceRecord.of(BlockDrive(file="/data.img", id="disk1")),),
        network=NetworkRecord(
            mode="user",
            publish=(
                PortRecord(host_ip="127.0.0.1", host_port=8080, guest_port=80, protocol="tcp"),
            ),
            allow_egress=("10.0.0.0/8:443",),
            egress_policy="allow-list",
            tap_range="10.213.0.0/16",
            guest=GuestRecord(interface="10.0.2.15/24", gateway="10.0.2.2", host="10.0.2.2"),
        ),
        image=ImageRecord(
            id="sha256:abc",
            ref="localhost/app:1",
            disk="/images/root.erofs",
            config=ImageConfig(env=("PATH=/bin",), cmd=("sh",), working_dir="/w", user="app"),
            passwd="app:x:1000:1000::/:/bin/sh\n",
            scratch_mb=64,
        ),
        owner_pid=4321,
        exit=ExitRecord(
            reason="the VMM was killed by signal 9", time=1_700_000_100.5, exit_code=-9
        ),
    )
    return replace(doc, **changes)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "vc", lock_timeout=10)


@pytest.fixture
def saved(store: StateStore) -> Path:
    """A sandbox with a saved document; returns its state.json path."""
    store.create_sandbox_dir(SID)
    store.save(SID, make_doc())
    return store.state_path(SID)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st = os.stat(path)
    return path.read_bytes(), st.st_ino, st.st_mtime_ns


# -- round trip ------------------------------------------------------------------------------


def test_round_trip(store: StateStore, saved: Path) -> None:
    loaded = store.load(SID)
    assert loaded == make_doc()
    assert loaded.hypervisor.block_index_map == {0: 1, 3: 7}
    assert loaded.hypervisor.bridges[0].device_addr == {1: "drive-0"}
    on_disk = json.loads(saved.read_text())
    assert on_disk["version"] == SCHEMA_VERSION == 2
    # Typed fields, not JSON strings inside JSON.
    assert on_disk["agent"] == {"kind": "serial", "path": "/run/vc/sb-1/agent.sock"}
    assert on_disk["devices"][0] == {
        "type": "BlockDrive",
        "spec": {**on_disk["devices"][0]["spec"], "file": "/images/root.erofs", "read_only": True},
    }
    assert on_disk["network"]["publish"][0]["host_port"] == 8080
    assert on_disk["exit"] == {"reason": "the VMM was killed by signal 9",
                               "time": 1_700_000_100.5, "exit_code": -9}  # fmt: skip
    assert loaded.state is VmState.RUNNING
    assert loaded.devices[1].device() == VhostUserDevice(
        socket_path="/run/fs.sock", id="fs1", type=VhostUserKind.FS
    )
    assert on_disk["id"] == SID


def test_json_round_trip_without_store() -> None:
    doc = make_doc()
    assert SandboxDocument.from_json(doc.to_json()) == doc
    assert SandboxDocument.from_json(doc.to_json().encode()) == doc


def test_save_replaces_previous_document(store: StateStore, saved: Path) -> None:
    store.save(SID, make_doc(state=VmState.STOPPED))
    assert store.load(SID).state is VmState.STOPPED
    assert sorted(p.name for p in saved.parent.iterdir()) == [".lock", "state.json"]


def test_save_rejects_unserializable_and_mismatched_documents(
    store: StateStore, saved: Path
) -> None:
    before = snapshot(saved)
    with pytest.raises(StoreError, match="not serializable"):
        store.save(SID, make_doc(config={"x": object()}))
    with pytest.raises(StoreError, match="not serializable"):
        store.save(SID, make_doc(created_at=float("nan")))
    with pytest.raises(StoreError, match="'other'"):
        store.save(SID, make_doc("other"))
    assert snapshot(saved) == before


def test_save_requires_the_sandbox_dir(store: StateStore) -> None:
    # A late save after delete() must not resurrect the sandbox.
    with pytest.raises(StoreError, match="no sandbox"):
        store.save(SID, make_doc())
    assert not store.sandbox_dir(SID).exists()


def test_load_missing(store: StateStore) -> None:
    with pytest.raises(StoreError, match="no sandbox"):
        store.load(SID)
    assert not store.root.exists(), "reading must not create the root"
    store.create_sandbox_dir(SID)
    with pytest.raises(StoreError, match="no state document"):
        store.load(SID)


# -- permissions -----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o277])
def test_permissions(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        store = StateStore(tmp_path / "a" / "vc")
        path = store.create_sandbox_dir(SID)
        store.save(SID, make_doc())
    finally:
        os.umask(old)
    for d in (tmp_path / "a", store.root, store.root / "sandboxes", path):
        assert mode(d) == 0o700, d
    assert mode(path / "state.json") == 0o600
    assert mode(path / ".lock") == 0o600


def test_create_sandbox_dir_twice_fails(store: StateStore) -> None:
    store.create_sandbox_dir(SID)
    with pytest.raises(StoreError, match="already exists"):
        store.create_sandbox_dir(SID)


def test_unsafe_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(StoreError, match="writable by group or others") as info:
        StateStore(root).create_sandbox_dir(SID)
    assert info.value.path == str(root)


def test_symlinked_state_file_is_not_followed(store: StateStore, tmp_path: Path) -> None:
    path = store.create_sandbox_dir(SID)
    target = tmp_path / "elsewhere.json"
    target.write_text(make_doc().to_json())
    (path / "state.json").symlink_to(target)
    with pytest.raises(StoreError, match="cannot open"):
        store.load(SID)


# -- atomicity -------------------------------------------------------------------------------


def test_failed_rename_keeps_old_document(
    store: StateStore, saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(saved)

    def crash(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="EIO") as info:
        store.save(SID, make_doc(state=VmState.STOPPED))
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()

    assert snapshot(saved) == before
    assert store.load(SID) == make_doc()
    assert sorted(p.name for p in saved.parent.iterdir()) == [".lock", "state.json"]


def test_interrupt_is_not_wrapped_and_keeps_old_document(
    store: StateStore, saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(saved)

    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save(SID, make_doc(state=VmState.STOPPED))
    monkeypatch.undo()
    assert snapshot(saved) == before


def test_disk_full_is_a_store_error(
    store: StateStore, saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(saved)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StoreError, match="ENOSPC") as info:
        store.save(SID, make_doc(state=VmState.STOPPED))
    monkeypatch.undo()
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert snapshot(saved) == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [".lock", "state.json"]


def test_temp_file_left_by_a_real_crash_is_ignored_then_cleaned(
    store: StateStore, saved: Path
) -> None:
    stale = saved.parent / ".state.abc123.tmp"
    stale.write_text('{"half a docu')
    assert store.load(SID) == make_doc()
    assert store.list() == [SID]
    store.save(SID, make_doc(state=VmState.PAUSED))
    assert not stale.exists()
    assert store.load(SID).state is VmState.PAUSED


# -- corrupt and future documents ------------------------------------------------------------


def _valid_obj() -> dict[str, object]:
    obj: dict[str, object] = json.loads(make_doc().to_json())
    return obj


def _with(**changes: object) -> bytes:
    obj = _valid_obj()
    obj.update(changes)
    return json.dumps(obj).encode()


def _without(key: str) -> bytes:
    obj = _valid_obj()
    del obj[key]
    return json.dumps(obj).encode()


def _hv(**changes: object) -> bytes:
    obj = _valid_obj()
    hv = dict(obj["hypervisor"])  # type: ignore[call-overload]
    hv.update(changes)
    obj["hypervisor"] = hv
    return json.dumps(obj).encode()


CORRUPT = {
    "not json": b'{"version": 1, "id": ',
    "empty file": b"",
    "not utf-8": b"\xff\xfe\x00garbage",
    "NaN": make_doc().to_json().replace("1700000000.25", "NaN").encode(),
    "top-level list": b"[1, 2]",
    "missing version": _without("version"),
    "bool version": _with(version=True),
    "string version": _with(version="1"),
    "zero version": _with(version=0),
    "missing key": _without("hypervisor"),
    "unknown key": _with(surprise=1),
    "id not a string": _with(id=7),
    "id is a path": _with(id="../etc"),
    "id of another sandbox": _with(id="other"),
    "created_at string": _with(created_at="yesterday"),
    "created_at bool": _with(created_at=True),
    "config a list": _with(config=[]),
    "annotation not a string": _with(annotations={"k": 1}),
    "a version 1 key in version 2": _with(extra={"k": "v"}),
    "state not a lifecycle value": _with(state="exited-ish"),
    "state in another case": _with(state="RUNNING"),
    "agent of an unknown kind": _with(agent={"kind": "telepathy", "path": "/x"}),
    "agent without its port": _with(agent={"kind": "hybrid-vsock", "path": "/x"}),
    "devices as a JSON string": _with(devices="[]"),
    "device of an unknown type": _with(devices=[{"type": "os.system", "spec": {}}]),
    "device with an unknown field": _with(
        devices=[{"type": "BlockDrive", "spec": {"file": "/f", "id": "d", "evil": 1}}]
    ),
    "device field mistyped": _with(
        devices=[{"type": "BlockDrive", "spec": {"file": 7, "id": "d"}}]
    ),
    "network mode unknown": _with(network={"mode": "wormhole"}),
    "owner pid a string": _with(owner_pid="4321"),
    "exit without a reason": _with(exit={"time": 1.0}),
    "image without a disk": _with(image={"id": "x", "ref": "r"}),
    "hypervisor pid string": _hv(pid="4242"),
    "hypervisor flag int": _hv(hotplug_vfio_on_root_bus=1),
    "hypervisor unknown key": _hv(color="red"),
    "hypervisor bad block index": _hv(block_index_map={"x": 1}),
    "hypervisor bridges object": _hv(bridges={}),
    "hypervisor bridge without id": _hv(bridges=[{"type": "pci", "addr": 1}]),
}


def _write_bad(saved: Path, content: bytes) -> tuple[bytes, int, int]:
    """Put ``content`` in place of the state document; returns its snapshot."""
    saved.write_bytes(content)
    return snapshot(saved)


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_document_raises_and_is_left_untouched(
    store: StateStore, saved: Path, content: bytes
) -> None:
    before = _write_bad(saved, content)
    with pytest.raises(StoreError) as info:
        store.load(SID)
    assert info.value.path == str(saved)
    with pytest.raises(StoreError):
        store.update(SID, lambda d: replace(d, state=VmState.STOPPED))
    assert snapshot(saved) == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [".lock", "state.json"]


def test_future_version_raises_and_is_left_untouched(store: StateStore, saved: Path) -> None:
    obj = _valid_obj()
    obj["version"] = SCHEMA_VERSION + 1
    obj["new_field_from_the_future"] = {"x": 1}
    saved.write_text(json.dumps(obj))
    before = snapshot(saved)
    with pytest.raises(StoreError, match="newer") as info:
        store.load(SID)
    assert str(saved) in str(info.value)
    with pytest.raises(StoreError, match="newer"):
        store.update(SID, lambda d: d)
    assert snapshot(saved) == before


def test_corrupt_document_error_names_the_field_and_the_path(
    store: StateStore, saved: Path
) -> None:
    saved.write_bytes(_hv(pid="4242"))
    where = r"Expected `int`, got `str` - at `\$.hypervisor.pid`"
    with pytest.raises(StoreError, match=where) as info:
        store.load(SID)
    assert str(saved) in str(info.value)


def test_unserializable_state_is_refused_before_writing(store: StateStore, saved: Path) -> None:
    before = snapshot(saved)
    with pytest.raises(StoreError, match="not serializable"):
        store.update(SID, lambda d: replace(d, state="stolen"))  # type: ignore[arg-type]
    assert snapshot(saved) == before


# -- version 1 documents -----------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"


def _load_v1(store: StateStore, name: str) -> SandboxDocument:
    """A version 1 document written by the version 1 code (see the fixtures), loaded."""
    text = (FIXTURES / f"state_v1_{name}.json").read_text()
    assert json.loads(text)["version"] == 1
    store.create_sandbox_dir(name)
    store.state_path(name).write_text(text)
    return store.load(name)


def test_v1_created_document_migrates(store: StateStore) -> None:
    doc = _load_v1(store, "created")
    assert doc.state is VmState.CREATED
    assert doc.agent is None
    assert [r.device() for r in doc.devices] == [
        BlockDrive(file="/srv/data.img", id="data", read_only=True)
    ]
    assert doc.network.mode == "user"
    assert doc.network.publish == (
        PortRecord(host_ip="127.0.0.1", host_port=8080, guest_port=80, protocol="tcp"),
    )
    assert (doc.image, doc.owner_pid, doc.exit, doc.hotplugged) == (None, 0, None, ())
    assert doc.config["boot"]["kernel_path"] == "/opt/vc/vmlinuz"


def test_v1_document_of_a_dead_vm_migrates(store: StateStore) -> None:
    doc = _load_v1(store, "died")
    assert doc.state is VmState.STOPPED
    assert doc.agent == SerialChannel(path="/run/vc/died/agent.sock")
    assert doc.owner_pid == 4321
    assert doc.exit == ExitRecord(
        reason="the VMM was killed by signal 9", time=1764650000.5, exit_code=-9
    )
    assert [r.device() for r in doc.hotplugged] == [BlockDrive(file="/srv/extra.img", id="disk1")]
    assert doc.image is not None
    assert doc.image.config == ImageConfig(
        env=("PATH=/bin", "A=1"), cmd=("sh",), working_dir="/w", user="app",
        architecture="amd64", os="linux",
    )  # fmt: skip
    assert (doc.image.scratch_mb, doc.image.group) == (64, "app:x:1000:\n")
    assert doc.hypervisor.hotplugged_vcpus == ("cpu-1",)


def test_v1_document_is_written_back_as_v2(store: StateStore) -> None:
    doc = _load_v1(store, "running")
    assert doc.state is VmState.RUNNING
    assert doc.hypervisor.pid == 999999
    store.update("running", lambda d: replace(d, owner_pid=7))
    on_disk = json.loads(store.state_path("running").read_text())
    assert on_disk["version"] == 2
    assert on_disk["agent"] == {"kind": "hybrid-vsock", "path": "/run/vc/running/vsock.sock",
                                "port": 1024}  # fmt: skip
    assert store.load("running") == replace(doc, owner_pid=7)


def _v1(**extra: str) -> bytes:
    obj = json.loads((FIXTURES / "state_v1_created.json").read_text())
    obj["id"] = SID
    obj["extra"] = {**obj["extra"], **extra}
    return json.dumps(obj).encode()


V1_UNMIGRATABLE = {
    "an extra entry version 2 has no field for": _v1(note="keep me"),
    "extra JSON that is not JSON": _v1(network="{not json"),
    "an owner pid that is not a number": _v1(owner_pid="me"),
    "a device without a type": _v1(devices='[{"file": "/f"}]'),
    "a device field mistyped": _v1(devices='[{"type": "BlockDrive", "file": 1, "id": "d"}]'),
}


@pytest.mark.parametrize("content", V1_UNMIGRATABLE.values(), ids=V1_UNMIGRATABLE.keys())
def test_v1_document_that_cannot_be_migrated_names_the_version(
    store: StateStore, saved: Path, content: bytes
) -> None:
    before = _write_bad(saved, content)
    with pytest.raises(StoreError, match="version 1 state document cannot be migrated") as info:
        store.load(SID)
    assert info.value.path == str(saved)
    assert snapshot(saved) == before


def test_integer_created_at_is_accepted() -> None:
    doc = SandboxDocument.from_json(_with(created_at=1_700_000_000))
    assert doc.created_at == 1_700_000_000.0
    assert isinstance(doc.created_at, float)


# -- ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_id",
    ["../x", "", "a/b", "a" * 65, ".", "..", ".hidden", "-x", "a b", "a\n", "a\x00b", "é"],
)
def test_invalid_ids_are_rejected(store: StateStore, bad_id: str) -> None:
    for call in (
        lambda: store.sandbox_dir(bad_id),
        lambda: store.create_sandbox_dir(bad_id),
        lambda: store.load(bad_id),
        lambda: store.save(bad_id, make_doc()),
        lambda: store.delete(bad_id),
    ):
        with pytest.raises(StoreError, match=r"1-64 characters"):
            call()
    assert not store.root.exists()


@pytest.mark.parametrize("good_id", ["a", "A" * 64, "0.1_x-y", "a..b"])
def test_valid_ids(store: StateStore, good_id: str) -> None:
    path = store.create_sandbox_dir(good_id)
    assert path == store.root / "sandboxes" / good_id
    store.save(good_id, make_doc(good_id))
    assert store.load(good_id).id == good_id


# -- update, list, delete, lock --------------------------------------------------------------


def test_update_returns_and_persists(store: StateStore, saved: Path) -> None:
    new = store.update(SID, lambda d: replace(d, state=VmState.PAUSED, owner_pid=99))
    assert new.state is VmState.PAUSED
    assert store.load(SID) == new


def test_update_exceptions_write_nothing(store: StateStore, saved: Path) -> None:
    before = snapshot(saved)

    def boom(doc: SandboxDocument) -> SandboxDocument:
        raise ValueError("caller bug")

    with pytest.raises(ValueError, match="caller bug"):
        store.update(SID, boom)
    with pytest.raises(TypeError):
        store.update(SID, lambda d: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(StoreError, match="'other'"):
        store.update(SID, lambda d: replace(d, id="other"))
    assert snapshot(saved) == before


def test_list_and_delete(store: StateStore) -> None:
    assert store.list() == []
    for sid in ("b", "a", "c"):
        store.create_sandbox_dir(sid)
        store.save(sid, make_doc(sid))
    store.create_sandbox_dir("no-doc-yet")
    (store.root / "sandboxes" / ".junk").mkdir()
    assert store.list() == ["a", "b", "c"]
    assert store.exists("a")
    assert not store.exists("no-doc-yet")

    (store.sandbox_dir("b") / "console.log").write_text("driver files go here too")
    store.delete("b")
    assert not store.sandbox_dir("b").exists()
    store.delete("b")  # idempotent
    store.delete("never-existed")
    assert store.list() == ["a", "c"]
    with pytest.raises(StoreError):
        store.load("b")
    # the id can be reused after delete
    store.create_sandbox_dir("b")


def test_delete_removes_a_corrupt_sandbox(store: StateStore, saved: Path) -> None:
    saved.write_bytes(b"garbage")
    store.delete(SID)
    assert not saved.parent.exists()


def test_lock_is_reentrant_for_the_holder(store: StateStore, saved: Path) -> None:
    with store.lock(SID) as path:
        assert path == saved.parent
        doc = store.load(SID)
        store.save(SID, replace(doc, state=VmState.PAUSED))
        store.update(SID, lambda d: replace(d, annotations={"n": "1"}))
        # A second store object in the same thread shares the bookkeeping too.
        assert StateStore(store.root).load(SID).annotations == {"n": "1"}
    assert store.load(SID).state is VmState.PAUSED


def test_shared_lock_cannot_be_upgraded(store: StateStore, saved: Path) -> None:
    with store.lock(SID, exclusive=False):
        assert store.load(SID) == make_doc()
        with pytest.raises(StoreError, match="upgrade"):
            store.save(SID, make_doc())


def test_lock_excludes_other_threads_until_released(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "vc")
    store.create_sandbox_dir(SID)
    store.save(SID, make_doc())
    impatient = StateStore(store.root, lock_timeout=0.2)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            impatient.update(SID, lambda d: replace(d, state=VmState.FAILED))
        except BaseException as exc:
            errors.append(exc)

    with store.lock(SID):
        t = threading.Thread(target=writer)
        t.start()
        t.join(5)
    assert len(errors) == 1
    assert isinstance(errors[0], StoreError)
    assert "timed out" in str(errors[0])
    assert store.load(SID).state is VmState.RUNNING
    # Once released, the same writer succeeds.
    assert impatient.update(SID, lambda d: replace(d, state=VmState.EXITED)).state is VmState.EXITED


def test_waiting_writer_fails_when_sandbox_is_deleted(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "vc")
    store.create_sandbox_dir(SID)
    store.save(SID, make_doc())
    started = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        started.set()
        try:
            StateStore(store.root).save(SID, make_doc(state=VmState.STOPPED))
        except BaseException as exc:
            errors.append(exc)

    with store.lock(SID):
        t = threading.Thread(target=writer)
        t.start()
        started.wait(5)
        # Give the writer time to block on the lock (a stronger test than it needs to pass).
        t.join(0.2)
        store.delete(SID)
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], StoreError)
    assert not store.sandbox_dir(SID).exists(), "a late save must not resurrect the sandbox"


def _wait_for_flock_waiter(lock_file: Path) -> None:
    """Wait until /proc/locks shows a process blocked in flock(2) on ``lock_file``."""
    inode = os.stat(lock_file).st_ino
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            waiting = "->" in fields and fields[fields.index("->") + 1] == "FLOCK"
            if waiting and fields[-3].rsplit(":", 1)[-1] == str(inode):
                return
        time.sleep(0.005)
    pytest.fail(f"nobody blocked on {lock_file}")


def test_waiting_writer_relocks_a_recreated_sandbox(tmp_path: Path) -> None:
    # A writer blocked on the lock of a sandbox that is deleted and recreated under the same id
    # must not proceed on the old (unlinked) lock file while someone holds the new one.
    store = StateStore(tmp_path / "vc")
    store.create_sandbox_dir(SID)
    store.save(SID, make_doc())
    new_lock_held = threading.Event()
    release_new_lock = threading.Event()
    writer_done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            blocking = StateStore(store.root, lock_timeout=None)  # blocks in flock(2)
            blocking.update(SID, lambda d: replace(d, state=VmState.EXITED))
        except BaseException as exc:
            errors.append(exc)
        writer_done.set()

    def holder() -> None:
        with StateStore(store.root).lock(SID):
            new_lock_held.set()
            release_new_lock.wait(10)

    w = threading.Thread(target=writer)
    h = threading.Thread(target=holder)
    with store.lock(SID):
        w.start()
        _wait_for_flock_waiter(store.sandbox_dir(SID) / ".lock")
        store.delete(SID)
        store.create_sandbox_dir(SID)
        store.save(SID, make_doc(state=VmState.CREATED))
        h.start()
        assert new_lock_held.wait(5)
    # The old lock is released now; the writer must still wait for the holder of the new one.
    assert not writer_done.wait(0.3), "writer ran while another thread held the sandbox lock"
    release_new_lock.set()
    h.join(5)
    w.join(5)
    assert errors == []
    assert store.load(SID).state is VmState.EXITED


# -- concurrency -----------------------------------------------------------------------------

WORKERS = 4
UPDATES = 50


def _bump_many(root: str, worker: int) -> None:
    store = StateStore(Path(root), lock_timeout=60)
    for i in range(UPDATES):

        def bump(doc: SandboxDocument, i: int = i) -> SandboxDocument:
            count = int(doc.annotations.get("counter", "0"))
            return replace(
                doc,
                annotations={**doc.annotations, "counter": str(count + 1), f"w{worker}.{i}": ""},
            )

        store.update(SID, bump)


def _check_nothing_lost(store: StateStore) -> None:
    annotations = store.load(SID).annotations
    assert annotations["counter"] == str(WORKERS * UPDATES)
    assert {k for k in annotations if k.startswith("w")} == {
        f"w{w}.{i}" for w in range(WORKERS) for i in range(UPDATES)
    }


def test_concurrent_processes_lose_nothing(store: StateStore) -> None:
    store.create_sandbox_dir(SID)
    store.save(SID, make_doc(annotations={}))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_bump_many, args=(str(store.root), w)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    _check_nothing_lost(store)


def test_concurrent_threads_lose_nothing(store: StateStore) -> None:
    store.create_sandbox_dir(SID)
    store.save(SID, make_doc(annotations={}))
    threads = [
        threading.Thread(target=_bump_many, args=(str(store.root), w)) for w in range(WORKERS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    _check_nothing_lost(store)


# -- root selection --------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("VC_RUN_ROOT", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return monkeypatch


def test_root_as_root(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(os, "geteuid", lambda: 0)
    clean_env.setenv("XDG_RUNTIME_DIR", "/run/user/0")
    assert default_root() == Path("/run/virtcontainers")


def test_root_rootless_uses_xdg_runtime_dir(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(os, "geteuid", lambda: 1000)
    clean_env.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_root() == Path("/run/user/1000/virtcontainers")


@pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
def test_root_rootless_fallback(clean_env: pytest.MonkeyPatch, xdg: str | None) -> None:
    clean_env.setattr(os, "geteuid", lambda: 1000)
    if xdg is not None:
        clean_env.setenv("XDG_RUNTIME_DIR", xdg)
    assert default_root() == Path("/tmp/virtcontainers-1000")


@pytest.mark.parametrize("uid", [0, 1000])
def test_env_override_wins(clean_env: pytest.MonkeyPatch, tmp_path: Path, uid: int) -> None:
    clean_env.setattr(os, "geteuid", lambda: uid)
    clean_env.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    clean_env.setenv("VC_RUN_ROOT", str(tmp_path / "env-root"))
    assert default_root() == tmp_path / "env-root"
    assert StateStore().root == tmp_path / "env-root"
    # The constructor argument wins over the environment.
    assert StateStore(tmp_path / "arg-root").root == tmp_path / "arg-root"


def test_relative_env_override_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("VC_RUN_ROOT", "relative/root")
    with pytest.raises(StoreError, match="VC_RUN_ROOT"):
        StateStore()


def test_store_from_env_is_usable(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("VC_RUN_ROOT", str(tmp_path / "env-root"))
    store = StateStore()
    store.create_sandbox_dir(SID)
    store.save(SID, make_doc())
    assert (tmp_path / "env-root" / "sandboxes" / SID / "state.json").is_file()
    assert StateStore(tmp_path / "env-root").list() == [SID]
