"""The sandbox server: one long-lived process per running sandbox, serving every client.

As in Kata's containerd shim v2, one process owns each running sandbox for its whole life: it
boots (or adopts) the VM, holds the driver, the VMM's control socket (QMP/REST), the one
agent connection and the console watcher, records every state change and the VM's end in the
store, and serves a local API on ``<run dir>/server.sock`` (0600, peers checked with
``SO_PEERCRED``: the owner uid or root). ``vc``, ``Sandbox.attach``, ``SyncSandbox`` and
template clones are its clients; a library may still run a sandbox in-process without one.

Modules (the client half is imported by :mod:`virtcontainers.sandbox`; the server half
imports ``Sandbox``):

- :mod:`.wire` (both halves): the server's own requests, JSON in SERVER frames
- :mod:`.client`: :class:`~.client.ServerClient`, an ``AgentClient`` with the server's ops
- :mod:`.spawn`: start a server process, wait for its VM, the ephemeral lifeline
- :mod:`.relay`: the multiplexer, many clients onto one agent connection
- :mod:`.main`: the server process itself (``python -m virtcontainers.server``)

**Why the agent's own framing, relayed, and not HTTP or gRPC.** The traffic is mostly exec
streams: stdin, stdout, stderr, exit, flow-control credit and signals, many at once per
client, both directions. The agent protocol (``docs/agent-protocol.md``) already carries
exactly that, multiplexed with per-exec credit windows, and ``AgentClient`` already pipelines
it. Relaying it means the relay rewrites one request id per request and routes stream frames
by the agent's exec id; every existing client feature (tty, signals, files, timeouts) works
through the server unchanged, and the client costs nothing to import beyond what it already
needs (no HTTP stack, no protobuf runtime: the CLI must start in well under 100 ms). HTTP/1.1
over the unix socket would need a second protocol (websockets or chunked upgrades) for the
bidirectional streams, and grpcio adds ~100 ms of import and a generated-code build step. The
server's own few ops (pause, resize, stop, attach, ...) ride in one new frame type, SERVER, as
small JSON documents (:mod:`.wire`), with errors rebuilt as the same public error classes.
"""
