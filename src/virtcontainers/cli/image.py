"""``vc image``: OCI container images in the local store (pull, ls, rm, inspect, prune).

``vc image build`` is kept as an alias of ``vc guest build`` (the guest kernel + initramfs),
because scripts written before images existed call it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from virtcontainers.cli import guest, options
from virtcontainers.cli.app import app
from virtcontainers.cli.options import parse_bool
from virtcontainers.images import ImageStore, pull
from virtcontainers.images.pull import ProgressCallback

image_app = typer.Typer(
    help=(
        "OCI container images: the software a sandbox runs (`vc run --image REF`).\n\n"
        "References: NAME[:TAG] or HOST[:PORT]/PATH[:TAG][@sha256:HEX] (a registry), "
        "oci:DIR[:TAG] (an OCI layout), docker-archive:FILE (`docker save`), dir:PATH and "
        "tar:FILE (a plain root file system). A pull copies the image with skopeo, checks "
        "every blob's digest, unpacks the layers with umoci and builds a read-only root disk "
        "(erofs); images live under $XDG_CACHE_HOME/virtcontainers/oci/, keyed by their "
        "config digest.\n\nExamples:\n\n"
        "  vc image pull oci:./layout:latest\n"
        "  vc image pull --tls-verify=false 127.0.0.1:5000/team/app:1.0\n"
        "  vc image ls\n"
        "  vc image inspect team/app:1.0 --json\n"
        "  vc image rm team/app:1.0\n"
    ),
    no_args_is_help=True,
)
app.add_typer(image_app, name="image")

_out = Console() if sys.stdout.isatty() else Console(width=200)
_err = Console(stderr=True)

TlsVerify = options.TlsVerify


@contextmanager
def progress_bar(label: str, enabled: bool = True) -> Iterator[ProgressCallback]:
    """A rich progress bar on stderr when it is a terminal; a no-op otherwise."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    show = enabled and _err.is_terminal
    with Progress(*columns, console=_err, transient=True, disable=not show) as bar:
        task = bar.add_task(label, total=1.0)

        def update(step: str, fraction: float | None) -> None:
            bar.update(task, description=f"{label}: {step}", completed=fraction)

        yield update


@image_app.command("pull")
def pull_(
    ref: Annotated[str, typer.Argument(help="The image reference (see `vc image --help`).")],
    tls_verify: TlsVerify = "true",
    as_json: Annotated[bool, typer.Option("--json", help="Print the image as JSON.")] = False,
) -> None:
    """Fetch an image into the local store and build its root disk; prints its id."""
    verify = parse_bool(tls_verify, "--tls-verify")
    with progress_bar(ref, enabled=not as_json) as progress:
        image = pull(ref, tls_verify=verify, progress=progress)
    if as_json:
        sys.stdout.write(json.dumps(image.to_dict(), indent=2) + "\n")
        return
    _out.print(
        f"{image.id}  {image.disk_format} {image.disk_size / 1e6:.1f} MB  "
        f"({image.build_seconds:g} s)",
        highlight=False,
    )


@image_app.command("ls")
def ls(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List the images in the local store, newest first."""
    images = ImageStore().images()
    if as_json:
        sys.stdout.write(json.dumps([i.to_dict() for i in images], indent=2) + "\n")
        return
    if not images:
        _err.print("no images; fetch one with `vc image pull REF`")
        return
    table = Table("reference", "image id", "platform", "layers", "disk", "pulled")
    for column in table.columns:
        column.no_wrap = True
    for image in images:
        platform = f"{image.config.os}/{image.config.architecture}"
        for ref in image.refs or ("<none>",):
            table.add_row(
                ref,
                image.short_id,
                platform,
                str(image.layers),
                f"{image.disk_format} {image.disk_size / 1e6:.1f} MB",
                image.pulled_at[:16].replace("T", " "),
            )
    _out.print(table)


@image_app.command("rm")
def rm(
    refs: Annotated[list[str], typer.Argument(help="References or image ids to remove.")],
) -> None:
    """Untag images; an image no reference points to any more is deleted with its disk."""
    store = ImageStore()
    for ref in refs:
        for gone in store.remove(ref):
            _out.print(f"untagged {gone}", highlight=False, soft_wrap=True)


@image_app.command("inspect")
def inspect(
    ref: Annotated[str, typer.Argument(help="A reference or image id in the local store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (the default).")] = True,
) -> None:
    """Show a stored image: id, refs, digests, config (Env, Entrypoint, Cmd, ...), disk."""
    image = ImageStore().require(ref)
    sys.stdout.write(json.dumps(image.to_dict(), indent=2) + "\n")


@image_app.command("prune")
def prune() -> None:
    """Delete images no reference points to, and pulls left behind by dead processes."""
    removed = ImageStore().prune()
    for name in removed:
        _out.print(f"removed {name}", highlight=False)
    if not removed:
        _err.print("nothing to prune")


@image_app.command(
    "build",
    help="Alias of `vc guest build` (builds the guest kernel + initramfs, not an OCI image).",
)
def build_alias(
    flavour: Annotated[str, typer.Option("--flavour", "-f")] = "cloud",
    force: Annotated[bool, typer.Option("--force")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir")] = None,
) -> None:
    guest.build(flavour=flavour, force=force, as_json=as_json, cache_dir=cache_dir)
