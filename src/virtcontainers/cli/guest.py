"""``vc guest``: build and list the guest image (Debian kernel + busybox initramfs).

The guest image is the VM's boot and control plane (kernel, init, agent); the software a
sandbox runs comes from an OCI image (``vc image``). ``vc image build`` stays as an alias of
``vc guest build`` because scripts use it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from virtcontainers.cli.app import app
from virtcontainers.guest.image import (
    FLAVOURS,
    build_image,
    default_cache_dir,
    list_images,
    prune_images,
)

guest_app = typer.Typer(
    help=(
        "Build and list guest images: a Debian kernel plus a small busybox initramfs.\n\n"
        "The kernel comes from Debian's linux-image-*-unsigned package (downloaded with "
        "apt-get, never installed); the initramfs holds busybox, /init, the virtio modules of "
        "that same kernel and the guest agent when its source is present. Images are cached "
        "under $XDG_CACHE_HOME/virtcontainers/images/<key>/ (default ~/.cache); `vc run` "
        "uses the newest one unless given --kernel/--initrd.\n\n"
        "Flavours: "
        + "; ".join(f"{f.name}: {f.description}" for f in FLAVOURS.values())
        + ".\n\nExamples:\n\n"
        "  vc guest build                    # cloud kernel; cached after the first\n"
        "  vc guest build --flavour generic  # with 9p shared folders\n"
        "  vc guest build --force --json     # ask apt for a newer kernel\n"
        "  vc guest ls --json                # every cached manifest\n"
        "  vc guest prune --keep 1           # delete older images\n"
    ),
    no_args_is_help=True,
)
app.add_typer(guest_app, name="guest")

# Full paths and the table must not wrap when piped (rich assumes 80 columns then).
_out = Console() if sys.stdout.isatty() else Console(width=200)
_err = Console(stderr=True)


def _flavour_help() -> str:
    return "Kernel flavour: " + ", ".join(f"{f.name} ({f.description})" for f in FLAVOURS.values())


@guest_app.command(
    "build",
    help=(
        "Build the guest image (or reuse the cached one) and print where it is.\n\n"
        "The first build downloads the kernel package (~27 MB for cloud, ~70 MB for generic) "
        "and takes a few seconds. Later builds with unchanged inputs (init script, agent "
        "source, busybox) return the cached image at once without running apt; a changed "
        "agent source rebuilds offline from the cached .deb. --force asks apt again."
    ),
)
def build(
    flavour: Annotated[str, typer.Option("--flavour", "-f", help=_flavour_help())] = "cloud",
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Ask apt for the newest kernel and rebuild even if a matching image is cached.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the image's manifest as JSON.")
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="Cache root (default $XDG_CACHE_HOME/virtcontainers or ~/.cache/virtcontainers).",
        ),
    ] = None,
) -> None:
    """``vc guest build``: see the command's help."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
    )
    show = _err.is_terminal and not as_json
    with Progress(*columns, console=_err, transient=True, disable=not show) as bar:
        task = bar.add_task("guest image", total=1.0)

        def progress(step: str, fraction: float | None) -> None:
            bar.update(task, description=step, completed=fraction if fraction is not None else None)

        image = build_image(flavour, cache_dir=cache_dir, force=force, progress=progress)
    doc: dict[str, Any] = json.loads(image.manifest.read_text())
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    _out.print(f"[bold]{image.flavour}[/] image, kernel {image.kernel_release}", highlight=False)
    _out.print(f"  kernel  {image.kernel}", highlight=False, soft_wrap=True)
    _out.print(f"  initrd  {image.initrd}", highlight=False, soft_wrap=True)
    agent = "included" if doc.get("agent", {}).get("included") else "not included (no source)"
    _out.print(f"  agent   {agent}", highlight=False)
    _out.print(f"  built   {doc.get('built_at', '?')} in {doc.get('build_seconds', '?')} s")


@guest_app.command("ls")
def ls(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print every manifest as a JSON list.")
    ] = False,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Cache root to list.")
    ] = None,
) -> None:
    """List cached guest images, newest first (never runs apt)."""
    images = list_images(cache_dir)
    if as_json:
        sys.stdout.write(json.dumps([doc for _img, doc in images], indent=2) + "\n")
        return
    if not images:
        root = cache_dir or default_cache_dir()
        _err.print(f"no guest images under {root}/images; build one with `vc guest build`")
        return
    table = Table("key", "flavour", "kernel release", "version", "agent", "initrd", "built")
    for column in table.columns:
        column.no_wrap = True
    for image, doc in images:
        kernel_pkg = doc.get("packages", {}).get("kernel", {})
        table.add_row(
            str(doc.get("key", image.manifest.parent.name))[:12],
            image.flavour,
            image.kernel_release,
            str(kernel_pkg.get("version", "?")),
            "yes" if doc.get("agent", {}).get("included") else "no",
            f"{image.initrd.stat().st_size / 1e6:.1f} MB",
            str(doc.get("built_at", "?"))[:16].replace("T", " "),
        )
    _out.print(table)


@guest_app.command("prune")
def prune(
    keep: Annotated[
        int, typer.Option("--keep", min=1, help="Images to keep per flavour, newest first.")
    ] = 1,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Cache root to prune.")
    ] = None,
) -> None:
    """Delete older cached images (builds keep the 3 newest per flavour by themselves)."""
    removed = prune_images(cache_dir, keep=keep)
    for folder in removed:
        _out.print(f"removed {folder}", highlight=False, soft_wrap=True)
    if not removed:
        _err.print("nothing to prune")
