"""OCI container images as a sandbox's root file system.

* :mod:`~virtcontainers.images.reference`: parse ``name:tag``, ``host:port/ns/name@sha256:…``,
  ``oci:DIR[:TAG]``, ``docker-archive:FILE``, ``dir:PATH``, ``tar:FILE``;
* :mod:`~virtcontainers.images.pull`: skopeo copy → digest check → platform check → umoci
  unpack → read-only root disk (erofs, or ext4) → publish;
* :mod:`~virtcontainers.images.store`: the content-addressed local store (ls, rm, prune);
* :mod:`~virtcontainers.images.config`: the image config (Env, Entrypoint, Cmd, WorkingDir,
  User) and docker's override rules;
* :mod:`~virtcontainers.images.rootdisk`: the disk builders, and the scratch disk.

Nothing here knows a driver: a sandbox turns a :class:`StoredImage` into a read-only
:class:`~virtcontainers.devices.BlockDrive` that every driver cold-plugs.
"""

from virtcontainers.images.config import ImageConfig, ProcessSpec, process_spec, resolve_user
from virtcontainers.images.pull import PullPolicy, host_arch, pull
from virtcontainers.images.reference import ImageRef, Transport, parse_reference
from virtcontainers.images.store import ImageStore, StoredImage

__all__ = [
    "ImageConfig",
    "ImageRef",
    "ImageStore",
    "ProcessSpec",
    "PullPolicy",
    "StoredImage",
    "Transport",
    "host_arch",
    "parse_reference",
    "process_spec",
    "pull",
    "resolve_user",
]
