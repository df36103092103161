"""qcow2 internal snapshots: the snapshot table, and choosing one as ``-l`` asks.

The table is a run of variable-length entries at ``snapshots_offset`` (8-byte aligned)::

    l1_table_offset u64, l1_size u32, id_str_size u16, name_size u16,
    date_sec u32, date_nsec u32, vm_clock_nsec u64, vm_state_size u32,
    extra_data_size u32, extra data, id string, name string, padding to 8

Extra data holds, when long enough, the 64-bit VM state size and then the snapshot's
virtual disk size (older snapshots have the image's current size).
"""

from __future__ import annotations

import struct

import attrs

from ._codec import Qcow2FormatError

__all__ = ["Snapshot", "SnapshotSpec", "find_snapshot", "parse_snapshot_spec", "parse_snapshots"]

_ENTRY = struct.Struct(">QIHHIIQII")
#: Upper bound on one table entry's variable part (qemu allows 1 KiB of extra data).
_MAX_EXTRA = 1024
#: Upper bound on the number of snapshots (qemu's QCOW_MAX_SNAPSHOTS).
MAX_SNAPSHOTS = 65536


@attrs.frozen
class Snapshot:
    """One internal snapshot."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    disk_size: int | None
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    icount: int | None = None

    def describe(self) -> dict[str, object]:
        """The snapshot as ``qemu-img info --output json`` lists it."""
        out: dict[str, object] = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None:
            out["icount"] = self.icount
        return out


@attrs.frozen
class SnapshotSpec:
    """What ``-l`` names: an id, a name, or either (plain ``-l NAME`` and ``-s``)."""

    id: str | None = None
    name: str | None = None
    either: str | None = None

    def __str__(self) -> str:
        return self.either or self.id or self.name or ""


def parse_snapshot_spec(text: str) -> SnapshotSpec:
    """Parse ``snapshot.id=ID[,snapshot.name=NAME]`` or a plain id-or-name."""
    if not text.startswith("snapshot."):
        return SnapshotSpec(either=text)
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("snapshot.id", "snapshot.name"):
            raise ValueError(f"Failed in parsing snapshot param '{text}'")
        fields[key] = value
    return SnapshotSpec(id=fields.get("snapshot.id"), name=fields.get("snapshot.name"))


def parse_snapshots(data: bytes, count: int) -> list[Snapshot]:
    """Decode ``count`` table entries from ``data``.

    Raises:
        Qcow2FormatError: the table is truncated or an entry is malformed.
    """
    if count > MAX_SNAPSHOTS:
        raise Qcow2FormatError(f"Too many snapshots ({count})")
    out = []
    pos = 0
    for i in range(count):
        if pos + _ENTRY.size > len(data):
            raise Qcow2FormatError(f"Snapshot table entry {i} is truncated")
        l1_offset, l1_size, id_len, name_len, sec, nsec, clock, vmstate, extra_len = (
            _ENTRY.unpack_from(data, pos)
        )
        if extra_len > _MAX_EXTRA:
            raise Qcow2FormatError(f"Snapshot table entry {i}: extra data too large")
        pos += _ENTRY.size
        extra = data[pos : pos + extra_len]
        pos += extra_len
        end = pos + id_len + name_len
        if end > len(data):
            raise Qcow2FormatError(f"Snapshot table entry {i} is truncated")
        # As QEMU reads them: C strings (up to a NUL), bytes kept as they are.
        ident = _c_string(data[pos : pos + id_len])
        name = _c_string(data[pos + id_len : end])
        pos = -(-end // 8) * 8
        disk_size = int.from_bytes(extra[8:16], "big") if len(extra) >= 16 else None
        if len(extra) >= 8:
            vmstate = int.from_bytes(extra[:8], "big", signed=True)  # (an int64 in QEMU)
        icount = int.from_bytes(extra[16:24], "big") if len(extra) >= 24 else None
        if icount == (1 << 64) - 1:
            icount = None
        out.append(
            Snapshot(ident, name, l1_offset, l1_size, disk_size, sec, nsec, clock, vmstate, icount)
        )
    return out


def _c_string(raw: bytes) -> str:
    """A snapshot's ID or name as QEMU has it: up to the first NUL, its bytes kept
    (those that are not UTF-8 as surrogate escapes, printed back as they were)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def table_length(data: bytes, count: int) -> int:
    """Bytes the first ``count`` entries of a snapshot table take (entries are padded to
    8 bytes); the table must already have parsed (:func:`parse_snapshots`)."""
    pos = 0
    for _ in range(count):
        fields = _ENTRY.unpack_from(data, pos)
        id_len, name_len, extra_len = fields[2], fields[3], fields[8]
        pos = -(-(pos + _ENTRY.size + extra_len + id_len + name_len) // 8) * 8
    return pos


def table_bytes_bound(count: int) -> int:
    """The largest table ``count`` entries can make (to bound the read)."""
    return count * (_ENTRY.size + _MAX_EXTRA + 2 * 65535 + 8)


def find_snapshot(snapshots: list[Snapshot], spec: SnapshotSpec) -> Snapshot | None:
    """The snapshot ``spec`` names; a plain name matches an id first, as qemu does."""
    if spec.either is not None:
        for snap in snapshots:
            if snap.id == spec.either:
                return snap
        for snap in snapshots:
            if snap.name == spec.either:
                return snap
        return None
    for snap in snapshots:
        if (spec.id is None or snap.id == spec.id) and (
            spec.name is None or snap.name == spec.name
        ):
            return snap
    return None
