"""``vc image``: OCI container images in the local store (pull, ls, rm, inspect, prune).

``vc image build`` is kept as an alias of ``vc guest build`` (the guest kernel + initramfs),
because scripts written before images existed call it.
"""

from __future__ import annotations

import json
import sys

import click
from rich.table import Table

from virtcontainers.cli import guest, options
from virtcontainers.cli.options import parse_bool
from virtcontainers.cli.terminal import err, out, progress_bar
from virtcontainers.images import ImageStore, pull


@click.group(
    no_args_is_help=True,
    help=(
        "OCI container images: the software a sandbox runs (`vc run --image REF`).\n\n"
        "References: NAME[:TAG] or HOST[:PORT]/PATH[:TAG][@sha256:HEX] (a registry), "
        "oci:DIR[:TAG] (an OCI layout), docker-archive:FILE (`docker save`), dir:PATH and "
        "tar:FILE (a plain root file system). A pull copies the image with skopeo, checks "
        "every blob's digest, unpacks the layers with umoci and builds a read-only root disk "
        "(erofs); images live under $XDG_CACHE_HOME/virtcontainers/oci/, keyed by their "
        "config digest.\n\nExamples:\n\n\b\n"
        "  vc image pull oci:./layout:latest\n"
        "  vc image pull --tls-verify=false 127.0.0.1:5000/team/app:1.0\n"
        "  vc image ls\n"
        "  vc image inspect team/app:1.0 --json\n"
        "  vc image rm team/app:1.0\n"
    ),
)
def image() -> None:
    pass


@image.command("pull")
@click.argument("ref", help="The image reference (see `vc image --help`).")
@options.tls_verify_option
@click.option("--json", "as_json", is_flag=True, help="Print the image as JSON.")
def pull_(ref: str, tls_verify: str, as_json: bool) -> None:
    """Fetch an image into the local store and build its root disk; prints its id."""
    verify = parse_bool(tls_verify, "--tls-verify")
    with progress_bar(ref, enabled=not as_json) as progress:
        stored = pull(ref, tls_verify=verify, progress=progress)
    if as_json:
        sys.stdout.write(json.dumps(stored.to_dict(), indent=2) + "\n")
        return
    out.print(
        f"{stored.id}  {stored.disk_format} {stored.disk_size / 1e6:.1f} MB  "
        f"({stored.build_seconds:g} s)",
        highlight=False,
    )


@image.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def ls(as_json: bool) -> None:
    """List the images in the local store, newest first."""
    images = ImageStore().images()
    if as_json:
        sys.stdout.write(json.dumps([i.to_dict() for i in images], indent=2) + "\n")
        return
    if not images:
        err.print("no images; fetch one with `vc image pull REF`")
        return
    table = Table("reference", "image id", "platform", "layers", "disk", "pulled")
    for column in table.columns:
        column.no_wrap = True
    for stored in images:
        platform = f"{stored.config.os}/{stored.config.architecture}"
        for ref in stored.refs or ("<none>",):
            table.add_row(
                ref,
                stored.short_id,
                platform,
                str(stored.layers),
                f"{stored.disk_format} {stored.disk_size / 1e6:.1f} MB",
                stored.pulled_at[:16].replace("T", " "),
            )
    out.print(table)


@image.command("rm")
@click.argument("refs", nargs=-1, required=True, help="References or image ids to remove.")
def rm(refs: tuple[str, ...]) -> None:
    """Untag images; an image no reference points to any more is deleted with its disk."""
    store = ImageStore()
    for ref in refs:
        for gone in store.remove(ref):
            out.print(f"untagged {gone}", highlight=False, soft_wrap=True)


@image.command("inspect")
@click.argument("ref", help="A reference or image id in the local store.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the default).")
def inspect(ref: str, as_json: bool) -> None:
    """Show a stored image: id, refs, digests, config (Env, Entrypoint, Cmd, ...), disk."""
    stored = ImageStore().require(ref)
    sys.stdout.write(json.dumps(stored.to_dict(), indent=2) + "\n")


@image.command("prune")
def prune() -> None:
    """Delete images no reference points to, and pulls left behind by dead processes."""
    removed = ImageStore().prune()
    for name in removed:
        out.print(f"removed {name}", highlight=False)
    if not removed:
        err.print("nothing to prune")


image.add_command(
    click.Command(
        "build",
        callback=guest.build.callback,
        params=guest.build.params,
        help="Alias of `vc guest build` (builds the guest kernel + initramfs, not an OCI image).",
    )
)
