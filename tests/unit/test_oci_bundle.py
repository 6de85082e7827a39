"""The OCI runtime's checks before anything exists: bad bundles fail create clearly and
leave nothing; the mount plan; the state record. No VM (see tests/integration for those)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from virtcontainers.errors import (
    BundleError,
    ContainerNotFoundError,
    ContainerStateError,
)
from virtcontainers.oci.cli import main
from virtcontainers.oci.exec import process_from_args
from virtcontainers.oci.spec import load_bundle, load_process
from virtcontainers.oci.state import StateDir, Status
from virtcontainers.oci.vm import plan_mounts


def _spec(**over: object) -> dict[str, object]:
    spec: dict[str, object] = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": ["sh"], "cwd": "/"},
    }
    spec.update(over)
    return spec


def _bundle(tmp_path: Path, spec: object, *, rootfs: bool = True) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    if rootfs:
        (bundle / "rootfs/bin").mkdir(parents=True)
        (bundle / "rootfs/bin/sh").write_text("#!/bin/true\n")
        (bundle / "rootfs/bin/sh").chmod(0o755)
    if spec is not None:
        text = spec if isinstance(spec, str) else json.dumps(spec)
        (bundle / "config.json").write_text(text)
    return bundle


@pytest.mark.parametrize(
    ("spec", "rootfs", "words"),
    [
        (None, True, "no config.json"),
        ("{not json", True, "is not valid JSON"),
        (_spec(), False, "is not a directory"),
        (_spec(process={"args": "sh"}), True, "Expected `array`, got `str` - at `$.process.args`"),
        (_spec(process={"args": []}), True, "process.args must name the program"),
        (_spec(process={"args": ["sh"], "cwd": "tmp"}), True, "must be absolute"),
        (_spec(hooks={"prestart": [{"path": "/bin/true"}]}), True, "hooks is unsupported"),
        (_spec(linux={"namespaces": [{"type": "network", "path": "/proc/1/ns/net"}]}), True,
         "cannot enter a host namespace (with podman: --network none)"),
        (_spec(linux={"uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]}), True,
         "linux.uidMappings is unsupported"),
        (_spec(mounts=[{"destination": "/n", "type": "nfs", "source": "h:/x"}]), True,
         "mount type 'nfs' is unsupported in a VM"),
        (_spec(mounts=[{"destination": "/d", "type": "bind", "source": "/no/such/dir"}]), True,
         "bind source /no/such/dir: No such file or directory"),
        (_spec(process={"args": ["sh"], "rlimits": [{"type": "RLIMIT_BOGUS", "hard": 1,
                                                     "soft": 1}]}), True, "unknown rlimit"),
    ],
)  # fmt: skip
def test_a_bad_bundle_fails_create_clearly_and_creates_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    spec: object,
    rootfs: bool,
    words: str,
) -> None:
    bundle = _bundle(tmp_path, spec, rootfs=rootfs)
    with pytest.raises(BundleError) as info:
        plan_mounts(load_bundle(bundle))
    assert words in str(info.value)
    root = tmp_path / "root"
    pid_file = tmp_path / "pid"
    code = main(["--root", str(root), "create", "--bundle", str(bundle),
                 "--pid-file", str(pid_file), "c1"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("vc-runtime: ")
    assert words in err
    assert not root.exists() or list(root.iterdir()) == []
    assert not pid_file.exists()


def test_state_kill_delete_of_an_unknown_id_say_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["state", "x1"], ["kill", "x1", "KILL"], ["delete", "--force", "x1"],
                    ["start", "x1"]):  # fmt: skip
        assert main(["--root", str(tmp_path), *command]) == 1
        assert "container x1 does not exist" in capsys.readouterr().err
    with pytest.raises(ContainerNotFoundError):
        StateDir(tmp_path).load("x1")


def test_a_podman_style_spec_is_planned_into_snapshots_copies_and_guest_mounts(
    tmp_path: Path,
) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    mounts = [
        {"destination": "/data", "type": "bind", "source": str(volume),
         "options": ["rw", "rprivate", "rbind"]},
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
        {"destination": "/dev/shm", "type": "bind", "source": str(volume), "options": ["bind"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts),
         "options": ["bind", "rprivate"]},
        {"destination": "/cache", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "size=8m"]},
    ]  # fmt: skip
    plan = plan_mounts(load_bundle(_bundle(tmp_path, _spec(mounts=mounts))))
    assert plan.snapshots == [("vcm-0", volume)]
    assert plan.files == [("/etc/hosts", hosts)]
    assert [(m.target, m.source, m.fstype, m.data) for m in plan.mounts] == [
        ("/data", "LABEL=vcm-0", "ext4", ""),
        ("/cache", "tmpfs", "tmpfs", "size=8m"),
    ]
    assert not plan.readonly_root


def test_exec_process_from_args_and_from_a_file(tmp_path: Path) -> None:
    process = process_from_args(["id"], cwd="/tmp", env=["A=1"], user="1000:10", tty=False)
    assert (process.user.uid, process.user.gid, process.cwd) == (1000, 10, "/tmp")
    assert process.environment()["A"] == "1"
    with pytest.raises(BundleError, match="expected UID"):
        process_from_args(["id"], cwd=None, env=[], user="app", tty=False)
    path = tmp_path / "process.json"
    path.write_text(json.dumps({"args": ["cat", "/etc/hostname"], "cwd": "/",
                                "user": {"uid": 0, "gid": 0}, "terminal": True}))  # fmt: skip
    loaded = load_process(path)
    assert loaded.args == ["cat", "/etc/hostname"]
    assert loaded.terminal
    path.write_text("[]")
    with pytest.raises(BundleError, match="Expected `object`"):
        load_process(path)


def test_a_record_whose_container_process_is_gone_reads_stopped(tmp_path: Path) -> None:
    states = StateDir(tmp_path)
    states.create("c2", tmp_path, {"a": "b"})
    states.update("c2", status=Status.RUNNING, pid=2**22 + 1)  # no such pid
    state = states.load("c2")
    assert state.status == Status.STOPPED
    assert state.oci()["pid"] == 0
    assert state.oci()["annotations"] == {"a": "b"}
    assert main(["--root", str(tmp_path), "delete", "c2"]) == 0
    assert not states.path("c2").exists()


def test_delete_without_force_is_refused_while_create_works(tmp_path: Path) -> None:
    from virtcontainers.oci.cli import _delete, _parser

    states = StateDir(tmp_path)
    states.create("c3", tmp_path, {})  # status creating: another create is still at work
    with pytest.raises(ContainerStateError, match="cannot delete container c3: it is creating"):
        _delete(_parser().parse_args(["delete", "c3"]), states)
    assert states.path("c3").exists()


def _kata_file(tmp_path: Path, enable: str) -> Path:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    path = tmp_path / "configuration-qemu.toml"
    path.write_text(
        f'[hypervisor.qemu]\npath = "/usr/bin/qemu-system-x86_64"\nkernel = "{kernel}"\n'
        f'initrd = "{kernel}"\ndefault_memory = 512\nenable_annotations = [{enable}]\n'
    )
    return path


def test_hypervisor_annotations_follow_the_enabled_list(tmp_path: Path) -> None:
    from virtcontainers.errors import AnnotationError
    from virtcontainers.oci.vm import hypervisor_config

    memory = {"io.katacontainers.config.hypervisor.default_memory": "1024"}
    kind, config = hypervisor_config(memory, config_file=_kata_file(tmp_path, '"default_memory"'))
    assert (kind, config.resources.memory_size) == ("qemu", 1024)
    with pytest.raises(AnnotationError, match="is not enabled"):
        hypervisor_config(memory, config_file=_kata_file(tmp_path, ""))
    kind, config = hypervisor_config({"io.podman.x": "y"}, config_file=_kata_file(tmp_path, ""))
    assert config.resources.memory_size == 512  # other annotations are not the VM's


def test_create_with_a_refused_annotation_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(annotations={"io.katacontainers.config.hypervisor.default_vcpus": "1"})
    bundle = _bundle(tmp_path, spec)
    root = tmp_path / "root"
    code = main(["--root", str(root), "--config", str(_kata_file(tmp_path, "")), "create",
                 "--bundle", str(bundle), "c4"])  # fmt: skip
    assert code == 1
    assert "default_vcpus is not enabled" in capsys.readouterr().err
    assert not root.exists() or list(root.iterdir()) == []


def test_find_program_resolves_symlinks_inside_the_root(tmp_path: Path) -> None:
    from virtcontainers.oci.spec import Process, find_program

    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")  # merged /usr, as Debian's
    tool = root / "usr/bin/python3.11"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (root / "usr/bin/python3").symlink_to("/usr/bin/python3.11")  # absolute: inside the root
    (root / "usr/bin/escape").symlink_to("/bin/sh")  # the host's /bin/sh must not count
    env = ["PATH=/bin"]
    assert find_program(root, Process(args=["python3"], env=env)) == tool
    assert find_program(root, Process(args=["/bin/python3"])) == tool
    assert find_program(root, Process(args=["escape"], env=env)) is None
    assert find_program(root, Process(args=["missing"], env=env)) is None
    (root / "usr/bin/data").write_text("not executable")
    assert find_program(root, Process(args=["data"], env=env)) is None
    # a bind-mounted program (podman run --init) arrives in the guest only
    assert find_program(root, Process(args=["/run/podman-init"]), ["/run/podman-init"]) == (
        "/run/podman-init"
    )
    assert find_program(root, Process(args=["tool"], env=["PATH=/opt/bin"]), ["/opt"]) == (
        "/opt/bin/tool"
    )


def test_errors_also_go_to_the_log_as_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "runtime.log"
    args = ["--root", str(tmp_path), "--log", str(log), "--log-format", "json"]
    assert main([*args, "state", "gone"]) == 1
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error"
    assert entry["msg"] == "container gone does not exist"
    assert "vc-runtime: container gone does not exist" in capsys.readouterr().err


def test_list_and_features(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    states = StateDir(tmp_path)
    states.create("c5", tmp_path, {})
    states.update("c5", status=Status.STOPPED)
    assert main(["--root", str(tmp_path), "list", "--format", "json"]) == 0
    [doc] = json.loads(capsys.readouterr().out)
    assert (doc["id"], doc["status"], doc["pid"]) == ("c5", "stopped", 0)
    assert main(["--root", str(tmp_path), "list", "-q"]) == 0
    assert capsys.readouterr().out == "c5\n"
    assert main(["features"]) == 0
    features = json.loads(capsys.readouterr().out)
    assert features["hooks"] == []
    assert "network" in features["linux"]["namespaces"]
