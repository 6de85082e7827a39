"""``vc guest``: build and list the guest image (Debian kernel + busybox initramfs).

The guest image is the VM's boot and control plane (kernel, init, agent); the software a
sandbox runs comes from an OCI image (``vc image``). ``vc image build`` stays as an alias of
``vc guest build`` because scripts use it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from virtcontainers.cli.terminal import err, out, progress_bar
from virtcontainers.guest.image import (
    FLAVOURS,
    build_image,
    default_cache_dir,
    list_images,
    prune_images,
)


@click.group(
    no_args_is_help=True,
    help=(
        "Build and list guest images: a Debian kernel plus a small busybox initramfs.\n\n"
        "The kernel comes from Debian's linux-image-*-unsigned package (downloaded with "
        "apt-get, never installed); the initramfs holds busybox, /init, the virtio modules of "
        "that same kernel and the guest agent when its source is present. Images are cached "
        "under $XDG_CACHE_HOME/virtcontainers/images/<key>/ (default ~/.cache); `vc run` "
        "uses the newest one unless given --kernel/--initrd.\n\n"
        "Flavours: "
        + "; ".join(f"{f.name}: {f.description}" for f in FLAVOURS.values())
        + ".\n\nExamples:\n\n\b\n"
        "  vc guest build                    # cloud kernel; cached after the first\n"
        "  vc guest build --flavour generic  # with 9p shared folders\n"
        "  vc guest build --force --json     # ask apt for a newer kernel\n"
        "  vc guest ls --json                # every cached manifest\n"
        "  vc guest prune --keep 1           # delete older images\n"
    ),
)
def guest() -> None:
    pass


_PATH = click.Path(path_type=Path)


def _flavour_help() -> str:
    return "Kernel flavour: " + ", ".join(f"{f.name} ({f.description})" for f in FLAVOURS.values())


@guest.command(
    "build",
    help=(
        "Build the guest image (or reuse the cached one) and print where it is.\n\n"
        "The first build downloads the kernel package (~27 MB for cloud, ~70 MB for generic) "
        "and takes a few seconds. Later builds with unchanged inputs (init script, agent "
        "source, busybox) return the cached image at once without running apt; a changed "
        "agent source rebuilds offline from the cached .deb. --force asks apt again."
    ),
)
@click.option("--flavour", "-f", default="cloud", help=_flavour_help())
@click.option(
    "--force",
    is_flag=True,
    help="Ask apt for the newest kernel and rebuild even if a matching image is cached.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the image's manifest as JSON.")
@click.option(
    "--cache-dir",
    type=_PATH,
    help="Cache root (default $XDG_CACHE_HOME/virtcontainers or ~/.cache/virtcontainers).",
)
def build(flavour: str, force: bool, as_json: bool, cache_dir: Path | None) -> None:
    """``vc guest build`` (and its alias ``vc image build``): see the command's help."""
    with progress_bar("guest image", enabled=not as_json) as progress:
        image = build_image(flavour, cache_dir=cache_dir, force=force, progress=progress)
    doc: dict[str, Any] = json.loads(image.manifest.read_text())
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    out.print(f"[bold]{image.flavour}[/] image, kernel {image.kernel_release}", highlight=False)
    out.print(f"  kernel  {image.kernel}", highlight=False, soft_wrap=True)
    out.print(f"  initrd  {image.initrd}", highlight=False, soft_wrap=True)
    agent = "included" if doc.get("agent", {}).get("included") else "not included (no source)"
    out.print(f"  agent   {agent}", highlight=False)
    out.print(f"  built   {doc.get('built_at', '?')} in {doc.get('build_seconds', '?')} s")


@guest.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print every manifest as a JSON list.")
@click.option("--cache-dir", type=_PATH, help="Cache root to list.")
def ls(as_json: bool, cache_dir: Path | None) -> None:
    """List cached guest images, newest first (never runs apt)."""
    images = list_images(cache_dir)
    if as_json:
        sys.stdout.write(json.dumps([doc for _img, doc in images], indent=2) + "\n")
        return
    if not images:
        root = cache_dir or default_cache_dir()
        err.print(f"no guest images under {root}/images; build one with `vc guest build`")
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
    out.print(table)


@guest.command("prune")
@click.option(
    "--keep", type=click.IntRange(min=1), default=1,
    help="Images to keep per flavour, newest first.",
)  # fmt: skip
@click.option("--cache-dir", type=_PATH, help="Cache root to prune.")
def prune(keep: int, cache_dir: Path | None) -> None:
    """Delete older cached images (builds keep the 3 newest per flavour by themselves)."""
    removed = prune_images(cache_dir, keep=keep)
    for folder in removed:
        out.print(f"removed {folder}", highlight=False, soft_wrap=True)
    if not removed:
        err.print("nothing to prune")
