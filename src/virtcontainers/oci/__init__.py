"""``vc-runtime``: an OCI runtime (the runc/crun command line) that runs each container in
its own sandbox VM, so podman (through conmon) and CRI-O can use it unchanged.

* :mod:`~virtcontainers.oci.spec`: the bundle's config.json as typed structs, and its checks;
* :mod:`~virtcontainers.oci.state`: the state directory (``--root``), one record per container;
* :mod:`~virtcontainers.oci.vm`: the VM's config, disks (root file system, bind snapshots)
  and the mounts the agent makes in the guest;
* :mod:`~virtcontainers.oci.create`, :mod:`~virtcontainers.oci.shim`: ``create`` and the
  container process conmon watches; :mod:`~virtcontainers.oci.exec`: ``exec``;
* :mod:`~virtcontainers.oci.relay`, :mod:`~virtcontainers.oci.ready`: stdio/pty relaying,
  the fork handshake;
* :mod:`~virtcontainers.oci.cli`: the command line.

Layering: this package sits beside ``cli/`` on top of ``sandbox.py`` and ``server/``
(``docs/architecture.md``); usage in ``docs/oci-runtime.md``.
"""
