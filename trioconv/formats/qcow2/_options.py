"""``-o`` options for creating qcow2 images, checked the way ``qemu-img create`` checks them.

:func:`parse_create_options` turns the option strings into a :class:`CreateOptions`
record and refuses invalid values and combinations with qemu-img's own messages, so a
script that works with ``qemu-img create -f qcow2 -o ...`` gets the same answers here.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ..._errors import UsageError
from ..._qemuopts import parse_bool
from ..._sizes import parse_size
from . import _codec as codec

__all__ = ["QCOW2_CREATE_OPTIONS", "CreateOptions", "parse_create_options"]

#: ``-o`` options a qcow2 target accepts, with the help text ``-o help`` prints.
QCOW2_CREATE_OPTIONS: dict[str, str] = {
    "backing_file": "File name of a base image",
    "backing_fmt": "Image format of the base image",
    "cluster_size": "qcow2 cluster size",
    "compat": "Compatibility level (v2 [0.10] or v3 [1.1])",
    "compression_type": "Compression method used for image cluster compression",
    "data_file": "File name of an external data file",
    "data_file_raw": "The external data file must stay valid as a raw image",
    "extended_l2": "Extended L2 tables",
    "lazy_refcounts": "Postpone refcount updates",
    "preallocation": "Preallocation mode (allowed values: off, metadata, falloc, full)",
    "refcount_bits": "Width of a reference count entry in bits",
    "size": "Virtual disk size",
}

#: What ``backing_fmt`` accepts: qemu's block driver names (its ``BlockdevDriver``).
BACKING_FORMATS = frozenset(
    [
        "blkdebug",
        "blklogwrites",
        "blkreplay",
        "blkverify",
        "bochs",
        "cloop",
        "compress",
        "copy-before-write",
        "copy-on-read",
        "dmg",
        "file",
        "snapshot-access",
        "ftp",
        "ftps",
        "gluster",
        "host_cdrom",
        "host_device",
        "http",
        "https",
        "io_uring",
        "iscsi",
        "luks",
        "nbd",
        "nfs",
        "null-aio",
        "null-co",
        "nvme",
        "nvme-io_uring",
        "parallels",
        "preallocate",
        "qcow",
        "qcow2",
        "qed",
        "quorum",
        "raw",
        "rbd",
        "replication",
        "ssh",
        "throttle",
        "vdi",
        "vhdx",
        "virtio-blk-vfio-pci",
        "virtio-blk-vhost-user",
        "virtio-blk-vhost-vdpa",
        "vmdk",
        "vpc",
        "vvfat",
    ]
)

_LEVEL_HINT = "(use version=v3 or greater)"


@attrs.frozen
class CreateOptions:
    """What a new qcow2 image looks like; the defaults are ``qemu-img create``'s.

    Attributes:
        version: 2 (compat 0.10) or 3 (compat 1.1).
        cluster_bits: log2 of the cluster size (9..21).
        refcount_order: log2 of the refcount width in bits (0..6).
        lazy_refcounts: set the lazy refcounts compatible feature bit.
        compression_type: :class:`~._codec.CompressionType`.
        extended_l2: 128-bit L2 entries with subcluster bitmaps.
        preallocation: off, metadata, falloc or full.
        backing_file: the backing file's name, stored as given (``-B``); None for none.
        backing_format: its format, stored in a header extension (``-F``).
        data_file: the external data file's name, stored as given (a relative name is
            from the working directory, as in qemu); None: the data lives in the image.
        data_file_raw: the data file stays a valid raw image (autoclear bit); implies
            ``preallocation=metadata`` at least, as in qemu.
    """

    version: int = 3
    cluster_bits: int = 16
    refcount_order: int = 4
    lazy_refcounts: bool = False
    compression_type: int = codec.CompressionType.ZLIB
    extended_l2: bool = False
    preallocation: str = "off"
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    data_file_raw: bool = False

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits


def _c_number(name: str, text: str) -> int:
    """``text`` read as qemu reads a number option (C's ``strtoull`` in base 0): leading
    white space, an optional sign, then decimal, octal after a leading ``0`` or hex after
    ``0x``; a minus wraps around as in C. ``010`` is 8.

    Raises:
        UsageError: not a number, or not below 2^64 (qemu's messages).
    """
    rest = text.lstrip(" \t\n\v\f\r")
    negative = rest[:1] == "-"
    if rest[:1] in ("-", "+"):
        rest = rest[1:]
    base = 10
    if rest[:2].lower() == "0x" and len(rest) > 2:
        base, rest = 16, rest[2:]
    elif rest[:1] == "0" and len(rest) > 1:
        base, rest = 8, rest[1:]
    digits = "0123456789abcdef"[:base]
    if not rest or any(c not in digits for c in rest.lower()):
        raise UsageError(f"Parameter '{name}' expects a number")
    value = int(rest, base)
    if value >= 1 << 64:
        raise UsageError(f"Value '{text}' is too large for parameter '{name}'")
    return -value % (1 << 64) if negative else value


def parse_create_options(options: Mapping[str, str]) -> CreateOptions:
    """Check the ``-o`` options of a new qcow2 image and decode them.

    Raises:
        UsageError: an invalid value or combination (qemu-img's message).
    """
    if options.get("backing_fmt") == "":
        raise UsageError("Parameter 'backing-fmt' does not accept value ''")
    backing_file = options.get("backing_file") or None
    backing_fmt = options.get("backing_fmt") or None
    if backing_fmt is not None and backing_file is None:
        raise UsageError("Backing format cannot be used without backing file")
    if backing_fmt is not None and backing_fmt not in BACKING_FORMATS:
        raise UsageError(f"Parameter 'backing-fmt' does not accept value '{backing_fmt}'")
    if backing_file is not None and len(backing_file.encode("utf-8")) > codec.MAX_BACKING_NAME:
        raise UsageError("Backing file name too long")
    compat = options.get("compat", "1.1")
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise UsageError(f"Parameter 'version' does not accept value '{compat}'")

    cluster_size = parse_size(options.get("cluster_size", "64k"), what="cluster size")
    if (
        cluster_size & (cluster_size - 1)
        or not 1 << codec.MIN_CLUSTER_BITS <= cluster_size <= 1 << codec.MAX_CLUSTER_BITS
    ):
        raise UsageError(
            f"Cluster size must be a power of two between {1 << codec.MIN_CLUSTER_BITS} and "
            f"{1 << (codec.MAX_CLUSTER_BITS - 10)}k"
        )
    cluster_bits = cluster_size.bit_length() - 1

    refcount_bits = _c_number("refcount_bits", options.get("refcount_bits", "16"))
    if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise UsageError("Refcount width must be a power of two and may not exceed 64 bits")

    lazy = parse_bool("lazy_refcounts", options.get("lazy_refcounts", "off"))
    extended_l2 = parse_bool("extended_l2", options.get("extended_l2", "off"))

    ctype_name = options.get("compression_type", "zlib")
    if ctype_name == "zlib":
        ctype = codec.CompressionType.ZLIB
    elif ctype_name == "zstd":
        ctype = codec.CompressionType.ZSTD
    else:
        raise UsageError(f"Parameter 'compression-type' does not accept value '{ctype_name}'")

    prealloc = options.get("preallocation", "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise UsageError(f"Parameter 'preallocation' does not accept value '{prealloc}'")

    if version < 3:
        if lazy:
            raise UsageError(
                "Lazy refcounts only supported with compatibility level 1.1 and above "
                + _LEVEL_HINT
            )
        if refcount_bits != 16:
            raise UsageError(
                "Different refcount widths than 16 bits require compatibility level 1.1 or "
                "above " + _LEVEL_HINT
            )
        if ctype != codec.CompressionType.ZLIB:
            raise UsageError(
                "Non-zlib compression type is only supported with compatibility level 1.1 "
                "and above " + _LEVEL_HINT
            )
        if extended_l2:
            raise UsageError(
                "Extended L2 entries are only supported with compatibility level 1.1 and "
                "above " + _LEVEL_HINT
            )
    if extended_l2 and cluster_bits < 14:
        raise UsageError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )
    data_file = options.get("data_file")
    if data_file == "":
        raise UsageError("Could not create '': No such file or directory")
    data_file_raw = parse_bool("data_file_raw", options.get("data_file_raw", "off"))
    if data_file is not None and version < 3:
        raise UsageError(
            "External data files are only supported with compatibility level 1.1 and above "
            + _LEVEL_HINT
        )
    if data_file_raw and data_file is None:
        raise UsageError("data-file-raw requires data-file")
    if data_file_raw and backing_file is not None:
        raise UsageError("Backing file and data-file-raw cannot be used at the same time")
    if data_file_raw and prealloc == "off":
        # Without mapped clusters the data file could not mirror the guest (qemu too).
        prealloc = "metadata"
    if backing_file is not None and prealloc != "off" and not extended_l2:
        raise UsageError(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
        )
    return CreateOptions(
        version=version,
        cluster_bits=cluster_bits,
        refcount_order=refcount_bits.bit_length() - 1,
        lazy_refcounts=lazy,
        compression_type=ctype,
        extended_l2=extended_l2,
        preallocation=prealloc,
        backing_file=backing_file,
        backing_format=backing_fmt,
        data_file=data_file,
        data_file_raw=data_file_raw,
    )
