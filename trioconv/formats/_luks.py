"""The LUKS1 header, decoded without I/O, and what ``qemu-img info`` shows of it.

LUKS (Linux Unified Key Setup) encrypts a disk with a random *master key* and keeps
that key, itself encrypted, in up to eight *key slots*, each unlocked by its own
passphrase. Everything needed to know *how* the disk is encrypted - but not the key -
is in the clear, in a fixed header of big-endian fields at the start of the volume::

    magic "LUKS\\xba\\xbe" | version (u16) | cipher name [32] | cipher mode [32]
    hash spec [32] | payload offset (u32, sectors) | key bytes (u32)
    master key digest [20] | digest salt [32] | digest iterations (u32) | uuid [40]
    8 x key slot: active (u32) | iterations (u32) | salt [32]
                  key material offset (u32, sectors) | stripes (u32)

The strings are NUL-terminated ASCII. The cipher mode carries the IV generator too:
``xts-plain64`` is XTS with 64-bit sector numbers as IVs, ``cbc-essiv:sha256`` is CBC
with IVs encrypted under a SHA-256 hash of the key. A sector is 512 bytes. A key slot
is *active* when its flag is ``0x00AC71F3`` and free when it is ``0x0000DEAD``; its
*key material* (the master key split into ``stripes`` pieces by the anti-forensic
splitter, so ``key bytes * stripes`` bytes) lies at its offset, between the header's
first 4 KiB and the payload.

The same header is a standalone LUKS image (the payload - the guest's disk - follows
it, so the disk is the file minus the payload offset) or lives inside a qcow2 image
(pointed at by a header extension; the guest's clusters are encrypted one by one).
LUKS2 (version 2, a JSON area after a binary header) is recognised and refused.

:func:`decode_header` checks what qemu's own open checks, so an image qemu-img refuses
is refused here too; :func:`describe` makes the dictionary ``qemu-img info`` shows.
"""

from __future__ import annotations

import struct

import attrs

from .._errors import UnsupportedError

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "LuksFormatError",
    "LuksHeader",
    "LuksSlot",
    "decode_header",
    "describe",
]

MAGIC = b"LUKS\xba\xbe"
#: The fields before the key slots, then one key slot.
HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
SLOT = struct.Struct(">II32sII")
SLOT_COUNT = 8
HEADER_SIZE = HEADER.size + SLOT_COUNT * SLOT.size  # 592
SECTOR = 512
SLOT_ACTIVE = 0x00AC71F3
SLOT_FREE = 0x0000DEAD
#: The anti-forensic splitter's stripe count: every LUKS1 writer uses 4000.
STRIPES = 4000
#: Key material starts past the header's first 4 KiB.
KEY_MATERIAL_START = 4096 // SECTOR

#: ``(cipher name, key bytes) -> cipher-alg`` as qemu names the algorithms. For XTS the
#: key is two keys of half the size each, and it is the half that names the algorithm.
_CIPHERS = {
    ("aes", 16): "aes-128",
    ("aes", 24): "aes-192",
    ("aes", 32): "aes-256",
    ("cast5", 16): "cast5-128",
    ("serpent", 16): "serpent-128",
    ("serpent", 24): "serpent-192",
    ("serpent", 32): "serpent-256",
    ("twofish", 16): "twofish-128",
    ("twofish", 24): "twofish-192",
    ("twofish", 32): "twofish-256",
    ("sm4", 16): "sm4",
}
_MODES = ("ecb", "cbc", "xts", "ctr")
_IVGENS = ("plain", "plain64", "essiv")
_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


class LuksFormatError(ValueError):
    """The bytes are not a LUKS1 header this reader can trust."""


@attrs.frozen
class LuksSlot:
    """One key slot.

    Attributes:
        active: a passphrase unlocks the master key through this slot.
        iterations: PBKDF2 iterations of its passphrase.
        key_offset: where its key material starts, in bytes from the header.
        stripes: how many pieces the master key is split into.
    """

    active: bool
    iterations: int
    key_offset: int
    stripes: int


@attrs.frozen
class LuksHeader:
    """A decoded, checked LUKS1 header; names as qemu names them (``cipher_alg``
    ``aes-256``, ``cipher_mode`` ``xts``, ``ivgen_alg`` ``plain64``).

    Attributes:
        payload_offset: where the encrypted data starts, in bytes from the header.
        key_bytes: the master key's length.
        master_key_iters: PBKDF2 iterations of the master key's digest.
        ivgen_hash_alg: the ESSIV hash; None for the other IV generators.
    """

    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str
    ivgen_hash_alg: str | None
    hash_alg: str
    payload_offset: int
    key_bytes: int
    master_key_iters: int
    uuid: str
    slots: tuple[LuksSlot, ...]


def _c_string(raw: bytes, what: str) -> str:
    """A NUL-terminated field; one that fills its field with no NUL is refused."""
    if b"\0" not in raw:
        raise LuksFormatError(f"the LUKS header's {what} is not NUL-terminated")
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def _parse_mode(spec: str) -> tuple[str, str, str | None]:
    """``xts-plain64`` -> ``("xts", "plain64", None)``; ``cbc-essiv:sha256`` ->
    ``("cbc", "essiv", "sha256")``."""
    mode, dash, ivgen = spec.partition("-")
    if not dash:
        raise LuksFormatError(f"unexpected LUKS cipher mode '{spec}' (expected MODE-IVGEN)")
    ivgen, colon, ivhash = ivgen.partition(":")
    if mode not in _MODES:
        raise LuksFormatError(f"unsupported LUKS cipher mode '{mode}'")
    if ivgen not in _IVGENS:
        raise LuksFormatError(f"unsupported LUKS IV generator '{ivgen}'")
    if colon and ivhash not in _HASHES:
        raise LuksFormatError(f"unsupported LUKS IV generator hash '{ivhash}'")
    if ivgen != "essiv":
        return mode, ivgen, None  # (a hash given to plain or plain64 means nothing)
    if not colon:
        raise LuksFormatError("the LUKS essiv IV generator names no hash")
    return mode, ivgen, ivhash


def decode_header(buf: bytes | bytearray | memoryview) -> LuksHeader:
    """Decode and check a LUKS1 header (the first :data:`HEADER_SIZE` bytes).

    The checks are those a reader must make before trusting the offsets: the strings
    end, the algorithms are known, the payload starts past the header, and every key
    slot is well-formed and lies between the header and the payload without
    overlapping another.

    Raises:
        LuksFormatError: not LUKS, truncated, or a field out of range.
        UnsupportedError: a LUKS version other than 1 (LUKS2).
    """
    data = bytes(buf[:HEADER_SIZE])
    if data[: len(MAGIC)] != MAGIC:
        raise LuksFormatError("Volume is not in LUKS format")
    if len(data) >= 8 and struct.unpack_from(">H", data, 6)[0] != 1:
        version = struct.unpack_from(">H", data, 6)[0]
        raise UnsupportedError(f"LUKS version {version} is not supported")
    if len(data) < HEADER_SIZE:
        raise LuksFormatError(f"the LUKS header is truncated ({len(data)} of {HEADER_SIZE} bytes)")
    (_magic, _version, name, mode, hash_spec, payload, key_bytes, _digest, _salt, mk_iters,
     uuid) = HEADER.unpack_from(data)  # fmt: skip
    cipher_name = _c_string(name, "cipher name")
    mode_spec = _c_string(mode, "cipher mode")
    hash_alg = _c_string(hash_spec, "hash spec")
    cipher_mode, ivgen_alg, ivgen_hash_alg = _parse_mode(mode_spec)
    half = key_bytes // 2 if cipher_mode == "xts" else key_bytes
    cipher_alg = _CIPHERS.get((cipher_name, half))
    if cipher_alg is None or (cipher_mode == "xts" and key_bytes % 2):
        raise LuksFormatError(
            f"unsupported LUKS cipher '{cipher_name}' with a key size of {key_bytes} bytes"
        )
    if hash_alg not in _HASHES:
        raise LuksFormatError(f"unsupported LUKS hash '{hash_alg}'")
    if payload < KEY_MATERIAL_START:
        raise LuksFormatError("the LUKS payload overlaps the LUKS header")
    if mk_iters == 0:
        raise LuksFormatError("the LUKS master key iteration count is zero")
    slots: list[LuksSlot] = []
    spans: list[tuple[int, int]] = []
    for i in range(SLOT_COUNT):
        active, iters, _slot_salt, start, stripes = SLOT.unpack_from(
            data, HEADER.size + i * SLOT.size
        )
        if active not in (SLOT_ACTIVE, SLOT_FREE):
            raise LuksFormatError(f"LUKS key slot {i} has a corrupt active flag {active:#x}")
        if stripes != STRIPES:
            raise LuksFormatError(f"LUKS key slot {i} is corrupt ({stripes} stripes, not 4000)")
        if active == SLOT_ACTIVE and iters == 0:
            raise LuksFormatError(f"LUKS key slot {i} has an iteration count of zero")
        end = start + -(-key_bytes * stripes // SECTOR)
        if start < KEY_MATERIAL_START:
            raise LuksFormatError(f"LUKS key slot {i} overlaps the LUKS header")
        if end > payload:
            raise LuksFormatError(f"LUKS key slot {i} overlaps the encrypted payload")
        for j, (other_start, other_end) in enumerate(spans):
            if start < other_end and other_start < end:
                raise LuksFormatError(f"LUKS key slots {j} and {i} overlap")
        spans.append((start, end))
        slots.append(LuksSlot(active == SLOT_ACTIVE, iters, start * SECTOR, stripes))
    return LuksHeader(
        cipher_alg=cipher_alg,
        cipher_mode=cipher_mode,
        ivgen_alg=ivgen_alg,
        ivgen_hash_alg=ivgen_hash_alg,
        hash_alg=hash_alg,
        payload_offset=payload * SECTOR,
        key_bytes=key_bytes,
        master_key_iters=mk_iters,
        uuid=uuid.split(b"\0", 1)[0].decode("ascii", "replace"),
        slots=tuple(slots),
    )


def describe(header: LuksHeader, *, qcow2: bool = False) -> dict[str, object]:
    """What ``qemu-img info`` shows of a LUKS header: a standalone image's
    ``format-specific`` data, or, with ``qcow2``, the ``encrypt`` entry of a qcow2
    image's (which also says ``"format": "luks"``).

    Keys come in the order qemu prints them - the order of its dictionary's hash
    buckets, which both its JSON and its human text follow - so the human layout, which
    walks the dictionary as it is, prints them as qemu-img does. A free key slot shows
    only where its key material would go.
    """
    slots: list[dict[str, object]] = []
    for slot in header.slots:
        entry: dict[str, object] = {"active": slot.active}
        if slot.active:
            entry["iters"] = slot.iterations
        entry["key-offset"] = slot.key_offset
        if slot.active:
            entry["stripes"] = slot.stripes
        slots.append(entry)
    out: dict[str, object] = {
        "ivgen-alg": header.ivgen_alg,
        "hash-alg": header.hash_alg,
        "cipher-alg": header.cipher_alg,
        "uuid": header.uuid,
    }
    if header.ivgen_hash_alg is not None:
        out["ivgen-hash-alg"] = header.ivgen_hash_alg
    if qcow2:
        out["format"] = "luks"
    out["cipher-mode"] = header.cipher_mode
    out["slots"] = slots
    out["payload-offset"] = header.payload_offset
    out["master-key-iters"] = header.master_key_iters
    return out
