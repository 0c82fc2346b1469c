"""The default guest image: a minimal Linux 6.12 kernel and a busybox initramfs
with the pyvmm agent. This module only locates the image; building it
(`ensure_built`, `python -m guest_images.build`) is in `guest_images.build`,
imported on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import recipe


@dataclass(frozen=True)
class GuestImage:
    vmlinux: Path  # ELF, bootable through its PVH note (no decompressor)
    bzimage: Path
    initramfs: Path  # uncompressed newc cpio
    system_map: Path
    config: Path  # the kernel's final .config

    def files(self) -> tuple[Path, ...]:
        return (self.vmlinux, self.bzimage, self.initramfs, self.system_map, self.config)

    @property
    def directory(self) -> Path:
        return self.vmlinux.parent


def image_for(inputs: recipe.Inputs) -> GuestImage:
    """Paths of the image built from these inputs; they may not exist yet."""
    d = recipe.image_dir(inputs)
    return GuestImage(
        vmlinux=d / recipe.VMLINUX,
        bzimage=d / recipe.BZIMAGE,
        initramfs=d / recipe.INITRAMFS,
        system_map=d / recipe.SYSTEM_MAP,
        config=d / recipe.KCONFIG,
    )


def default_image() -> GuestImage:
    """Paths of the image for the current inputs; they may not exist yet."""
    return image_for(recipe.snapshot())


def is_built(img: GuestImage | None = None) -> bool:
    img = img or default_image()
    return all(p.is_file() for p in img.files())


def ensure_built(progress: Callable[[str], None] = print) -> GuestImage:
    """Build whatever part of the default image is missing (minutes for the
    kernel) and return it; return at once when it is cached."""
    img = default_image()
    if is_built(img):
        return img
    from . import build  # heavy only when a build is needed

    return build.build_image(progress=progress)


__all__ = ["GuestImage", "default_image", "image_for", "is_built", "ensure_built"]
