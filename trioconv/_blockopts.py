"""QEMU's other ways to name an image: ``json:`` filenames, ``--image-opts`` and ``--object``.

A plain file name or URI says where an image is; QEMU also takes a tree of *block
options* that says how to open it - which format driver, which protocol underneath, and
options of either::

    --image-opts driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=/s
    'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "disk.qcow2"}}'

Both spell the same tree: dotted keys in a QemuOpts list (``key=value`` items, ``,,``
for a comma), or nested JSON objects. ``--object`` defines named things an option can
refer to: a ``secret`` (an iSCSI or HTTP password) or ``tls-creds-x509`` (certificates
for NBD over TLS, which qemu-img reaches no other way).

This module is pure: it parses those texts into a flat ``{dotted.key: value}`` mapping
and resolves the mapping into a :class:`BlockSpec` - a location trioconv's transports
understand (a path or a URI) plus the few options that change what is read (a raw
window's ``offset``/``size``, ``backing: null``, ``read-only``, ``force-share``,
``file.locking``, ``cache.direct``). Options that only tune QEMU's own caches are
accepted and have no effect; options that would change the data and that trioconv cannot
honour are refused by name, never ignored. Messages follow qemu-img's.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import json
import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping

import attrs

from ._errors import ImageError, UnsupportedError, UsageError
from ._qemuopts import parse_bool, split_option_list
from ._sizes import parse_size
from .protocols.null import DEFAULT_SIZE as NULL_SIZE
from .protocols.null import NullOptions

__all__ = [
    "BlockSpec",
    "Secret",
    "TLSCreds",
    "image_opts_to_json",
    "parse_image_opts",
    "parse_json_filename",
    "parse_object",
    "resolve",
    "resolve_json",
    "shown_name",
    "to_json_filename",
    "use_objects",
]

#: A flat option tree: dotted keys, string values; None is JSON ``null``.
Flat = dict[str, str | None]


# -- objects ---------------------------------------------------------------------------
@attrs.frozen
class Secret:
    """``--object secret,id=ID,data=TEXT|file=PATH[,format=raw|base64]``."""

    id: str
    value: str = attrs.field(repr=False)


@attrs.frozen
class TLSCreds:
    """``--object tls-creds-x509,id=ID,dir=DIR[,endpoint=client][,verify-peer=on|off]``.

    ``dir`` holds ``ca-cert.pem`` and, for a client certificate, ``client-cert.pem`` and
    ``client-key.pem`` - QEMU's names, which libnbd and nbdkit share.
    """

    id: str
    dir: str
    verify_peer: bool = True


QemuObject = Secret | TLSCreds

_OBJECTS: contextvars.ContextVar[Mapping[str, QemuObject] | None] = contextvars.ContextVar(
    "trioconv_qemu_objects", default=None
)

#: QEMU object types that qemu-img knows and trioconv does not implement.
_OTHER_OBJECT_TYPES = {
    "tls-creds-psk",
    "tls-creds-anon",
    "tls-cipher-suites",
    "throttle-group",
    "iothread",
    "authz-simple",
    "authz-list",
    "authz-listfile",
    "authz-pam",
}

#: Why some of :data:`_OTHER_OBJECT_TYPES` are refused, told with the refusal.
_OBJECT_TYPE_REASONS = {
    "tls-creds-psk": "trioconv speaks TLS with X.509 certificates only",
    "tls-creds-anon": "trioconv speaks TLS with X.509 certificates only",
}


def use_objects(
    objects: Iterable[QemuObject],
) -> contextvars.Token[Mapping[str, QemuObject] | None]:
    """Make ``objects`` what block options of this context (and the Trio tasks it starts
    from now on) can refer to by id. Returns the token to reset the variable with.

    Raises:
        UsageError: two objects share an id.
    """
    table: dict[str, QemuObject] = {}
    for obj in objects:
        if obj.id in table:
            raise UsageError(f"attempt to add duplicate property '{obj.id}' to object")
        table[obj.id] = obj
    return _OBJECTS.set(table)


def _bool(value: str | None, key: str) -> bool:
    return parse_bool(key, value or "")


def parse_object(text: str) -> QemuObject:
    """Parse one ``--object`` value (``TYPE,id=ID,key=value,...``).

    A ``secret`` read from a file is read here, and a ``tls-creds-x509`` folder must
    hold its CA certificate, as QEMU checks when it creates the object.

    Raises:
        UsageError: malformed, a required property missing, or an unknown type.
        UnsupportedError: a QEMU object type trioconv does not implement.
    """
    if text.lstrip().startswith("{"):
        return _object_from(_json_object(text))
    items = split_option_list(text)
    props: dict[str, str] = {}
    for n, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq:
            if n == 0:
                key, value = "qom-type", item
            else:
                value = "on"
        if not key:
            raise UsageError(f"Invalid parameter '{item}'")
        props[key] = value
    return _object_from(props)


def _json_object(text: str) -> dict[str, str]:
    """``--object '{"qom-type": "secret", "id": "s0", ...}'`` as properties."""
    try:
        tree = json.loads(text, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, _DuplicateKey, RecursionError):
        raise UsageError(f"Invalid JSON object given: {text}") from None
    if not isinstance(tree, dict):
        raise UsageError(f"Invalid JSON object given: {text}")
    flat: Flat = {}
    _flatten(tree, "", flat)
    return {k: v for k, v in flat.items() if v is not None}


def _object_from(props: dict[str, str]) -> QemuObject:
    qom_type = props.pop("qom-type", None)
    if not qom_type:
        raise UsageError("Parameter 'qom-type' is missing")
    obj_id = props.pop("id", None)
    if qom_type in _OTHER_OBJECT_TYPES:
        why = _OBJECT_TYPE_REASONS.get(qom_type)
        raise UnsupportedError(
            f"Object type '{qom_type}' is not supported" + (f" ({why})" if why else "")
        )
    if qom_type not in ("secret", "tls-creds-x509"):
        raise UsageError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    if not obj_id:
        raise UsageError("Parameter 'id' is missing")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", obj_id):
        raise UsageError(f"Parameter 'id' expects an identifier, not '{obj_id}'")
    if qom_type == "secret":
        return _secret(obj_id, props)
    return _tls_creds(obj_id, props)


def _secret(obj_id: str, props: dict[str, str]) -> Secret:
    data, path = props.pop("data", None), props.pop("file", None)
    fmt = props.pop("format", "raw")
    if "keyid" in props or "iv" in props:
        raise UnsupportedError(
            f"secret '{obj_id}': encrypted secrets (keyid, iv) are not supported"
        )
    for key in props:
        raise UsageError(f"Property 'secret.{key}' not found")
    if data is not None and path is not None:
        raise UsageError("'data' and 'file' are mutually exclusive")
    if data is None and path is None:
        raise UsageError("Either 'file' or 'data' must be provided")
    raw: bytes
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
        except OSError as exc:
            raise UsageError(f"Unable to read {path}: {exc.strerror}") from None
    else:
        raw = (data or "").encode()
    if fmt == "base64":
        try:
            raw = base64.b64decode(raw, validate=True)
        except binascii.Error:
            raise UsageError(f"secret '{obj_id}': the data is not valid base64") from None
    elif fmt != "raw":
        raise UsageError(f"Parameter 'format' does not accept value '{fmt}'")
    try:
        return Secret(obj_id, raw.decode())
    except UnicodeDecodeError:
        raise UsageError(f"secret '{obj_id}': the data is not UTF-8 text") from None


def _tls_creds(obj_id: str, props: dict[str, str]) -> TLSCreds:
    folder = props.pop("dir", None)
    endpoint = props.pop("endpoint", "client")
    verify = _bool(props.pop("verify-peer", "on"), "verify-peer")
    props.pop("priority", None)  # GnuTLS priority strings: Python's ssl picks its own
    props.pop("sanity-check", None)
    props.pop("loaded", None)
    if "passwordid" in props:
        raise UnsupportedError(
            f"tls-creds-x509 '{obj_id}': an encrypted private key (passwordid) is not supported"
        )
    for key in props:
        raise UsageError(f"Property 'tls-creds-x509.{key}' not found")
    if endpoint not in ("client", "server"):
        raise UsageError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    if endpoint == "server":
        raise UnsupportedError(
            f"tls-creds-x509 '{obj_id}': server credentials have no use here "
            "(trioconv is only ever the client)"
        )
    if folder is None:
        raise UsageError("Missing 'dir' property value")
    ca = f"{folder}/ca-cert.pem"
    if verify:
        try:
            with open(ca, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"Unable to access credentials {ca}: {exc.strerror}") from None
    return TLSCreds(obj_id, folder, verify)


def _object(obj_id: str, kind: type[QemuObject], what: str) -> QemuObject:
    obj = (_OBJECTS.get() or {}).get(obj_id)
    if obj is None:
        raise _Refused(f"No {what} with id '{obj_id}'")
    if not isinstance(obj, kind):
        raise _Refused(f"Object with id '{obj_id}' is not {what}")
    return obj


# -- option texts ----------------------------------------------------------------------
def parse_image_opts(text: str) -> Flat:
    """Parse an ``--image-opts`` value into a flat option tree.

    ``key=value`` items; a bare ``key`` means ``key=on`` (QEMU's deprecated short form).

    Raises:
        ImageError: an empty item or key.
    """
    flat: Flat = {}
    items = split_option_list(text)
    if len(items) > 1 and not items[-1]:
        items.pop()  # a trailing comma, as QEMU allows
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise ImageError(f"Could not open '{text}': Invalid parameter '{item}'")
        flat[key] = value if eq else "on"
    return flat


def parse_json_filename(text: str) -> Flat:
    """Parse ``json:{...}`` into a flat option tree (nested objects become dotted keys,
    ``true``/``false`` become ``on``/``off``, list items ``key.0``, ``key.1``, ...).

    Raises:
        ImageError: not valid JSON, or not an object.
    """
    body = text[5:] if text.startswith("json:") else text
    try:
        tree = json.loads(body, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ImageError(
            f"Could not open '{text}': Could not parse the JSON options: JSON parse error, "
            f"{exc.msg[:1].lower()}{exc.msg[1:]}"
        ) from None
    except _DuplicateKey as exc:
        raise ImageError(
            f"Could not open '{text}': Could not parse the JSON options: JSON parse error, "
            f"duplicate key '{exc}'"
        ) from None
    except RecursionError:
        raise ImageError(f"Could not open '{text}': the JSON options nest too deeply") from None
    if not isinstance(tree, dict):
        raise ImageError(f"Could not open '{text}': Invalid JSON object given")
    flat: Flat = {}
    _flatten(tree, "", flat)
    return flat


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _Number(str):
    """A JSON number in a flat tree (QEMU refuses one where it wants a string)."""

    __slots__ = ()


def _as_given(value: str | None) -> object:
    """An option's value as QEMU shows it in a ``json:`` name: a JSON number stays a
    number, anything else the text the user wrote (``"512K"``, ``"on"``)."""
    if isinstance(value, _Number):
        return json.loads(value)
    return value


def _flatten(value: object, prefix: str, out: Flat) -> None:
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix[:-1]] = ""
        for key, item in value.items():
            _flatten(item, f"{prefix}{key}.", out)
        return
    if isinstance(value, list):
        for n, item in enumerate(value):
            _flatten(item, f"{prefix}{n}.", out)
        return
    key = prefix[:-1]
    if value is None:
        out[key] = None
    elif isinstance(value, bool):
        out[key] = "on" if value else "off"
    elif isinstance(value, (int, float)):
        out[key] = _Number(value)
    else:
        out[key] = str(value)


def to_json_filename(flat: Mapping[str, str | None]) -> str:
    """A flat option tree written back as a ``json:`` filename (nested objects)."""
    tree: dict[str, object] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for name in parents:
            child = node.get(name)
            if not isinstance(child, dict):
                child = node[name] = {}
            node = child
        node[leaf] = value
    return "json:" + json.dumps(tree, separators=(",", ":"))


def image_opts_to_json(text: str, fmt: str | None = None) -> str:
    """Check an ``--image-opts`` value and give the ``json:`` filename it stands for.

    Raises:
        ImageError, UnsupportedError: as :func:`resolve`, naming ``text``.
    """
    flat = parse_image_opts(text)
    resolve(flat, text, fmt)
    name = to_json_filename(flat)
    _SHOWN[name] = text
    return name


#: ``json:`` names made from ``--image-opts`` values -> the values, for messages.
_SHOWN: dict[str, str] = {}


def protocol_node_json(filename: str, protocol: str) -> str:
    """The ``json:`` name of a bare protocol node on a local file (``-f file``, which
    qemu-img also takes as a format), shown in messages as the file's own name."""
    name = to_json_filename({"driver": protocol, "filename": filename})
    _SHOWN[name] = filename
    return name


def shown_name(text: str) -> str:
    """What the user wrote for a ``json:`` name made from ``--image-opts`` (or ``text``)."""
    return _SHOWN.get(text, text)


# -- resolving -------------------------------------------------------------------------
@attrs.frozen
class BlockSpec:
    """What an option tree asks for, in trioconv's terms.

    Attributes:
        location: the transport's location: a local path (``file:``-prefixed when the
            name looks like a URI, so it stays a file) or a URI.
        fmt: the format driver; None to probe.
        shown: the protocol's own name for messages (a file name or a URI, never with a
            password).
        name: the image's name as QEMU shows it (``qemu-img info``'s ``image:``): the
            file name or URI when only those were asked, else a ``json:`` name of the
            options that change what is read.
        protocol: the protocol driver at the bottom (``file``, ``nbd``, ...).
        inner: the format node under this one (``driver=qcow2,file.driver=raw,
            file.offset=...``: a qcow2 image inside a window of a file), or None when
            this format sits on the protocol directly.
        offset, size: the raw format's window into what it sits on (``size`` None: to
            the end).
        no_backing: ``backing: null``: unallocated areas read as zeroes.
        read_only, force_share: ``read-only``, ``force-share``; None when not given.
        locking: False for ``file.locking=off``: no image locks at all.
        direct: True for ``cache.direct=on``: ``O_DIRECT``.
        tls_verify: False for ``sslverify=off`` (HTTPS): any certificate is accepted.
        timeout: HTTP(S) ``timeout``: seconds a request may take; iSCSI ``timeout``:
            seconds the login may take; None for the default.
        cookie: HTTP(S) ``cookie`` (or the ``cookie-secret``'s value): sent with every
            request.
        proxy_user, proxy_password: HTTP(S) ``proxy-username`` and the
            ``proxy-password-secret``'s value, for the environment's proxy.
        chap: iSCSI ``user`` and ``password-secret`` (or ``password``), for CHAP.
        null: a null device's options (``driver=null-co,size=...``).
        nbd_open_timeout: NBD ``open-timeout``: seconds during which a failed connect
            is tried again (0: one attempt).
        nbd_reconnect_delay: NBD ``reconnect-delay``: seconds during which requests
            wait for a lost connection to be made again (0: a loss fails them).
    """

    location: str
    fmt: str | None
    shown: str
    name: str = ""
    protocol: str = "file"
    inner: BlockSpec | None = None
    offset: int = 0
    size: int | None = None
    no_backing: bool = False
    read_only: bool | None = None
    force_share: bool | None = None
    locking: bool = True
    direct: bool = False
    tls_verify: bool = True
    timeout: float | None = None
    cookie: str | None = attrs.field(default=None, repr=False)
    proxy_user: str | None = None
    proxy_password: str | None = attrs.field(default=None, repr=False)
    chap: tuple[str, str] | None = attrs.field(default=None, repr=False)
    null: NullOptions | None = None
    nbd_open_timeout: int = 0
    nbd_reconnect_delay: int = 0


#: The largest HTTP ``timeout`` QEMU takes, in seconds (its CURL_TIMEOUT_MAX).
HTTP_TIMEOUT_MAX = 10_000


class _Refused(Exception):
    """An option tree trioconv cannot open; the caller adds "Could not open 'TEXT': "."""

    def __init__(self, message: str, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


#: Format drivers QEMU has that trioconv does not read.
_OTHER_FORMATS = {
    "parallels",
    "dmg",
    "cloop",
    "bochs",
    "vvfat",
    "qcow",
    "throttle",
    "blkdebug",
    "blkverify",
    "blklogwrites",
    "copy-on-read",
    "preallocate",
    "quorum",
    "replication",
    "compress",
    "copy-before-write",
    "snapshot-access",
}
_PROTOCOLS = {
    "file",
    "host_device",
    "host_cdrom",
    "nbd",
    "nfs",
    "iscsi",
    "http",
    "https",
    "null-co",
    "null-aio",
}
_OTHER_PROTOCOLS = {"ssh", "rbd", "gluster", "ftp", "ftps", "iser", "nvme", "io_uring", "vxhs"}

#: Options any node takes; those not listed here as honoured only tune QEMU itself.
_GENERIC = {
    "driver",
    "node-name",
    "discard",
    "detect-zeroes",
    "auto-read-only",
    "read-only",
    "force-share",
    "cache.direct",
    "cache.no-flush",
}
_FORMAT_OPTIONS: dict[str, set[str]] = {
    "raw": {"offset", "size"},
    "qcow2": {
        "lazy-refcounts",
        "pass-discard-request",
        "pass-discard-snapshot",
        "pass-discard-other",
        "discard-no-unref",
        "overlap-check",
        "cache-size",
        "l2-cache-size",
        "l2-cache-entry-size",
        "refcount-cache-size",
        "cache-clean-interval",
        "backing",
    },
    "qed": {"backing"},
    "vmdk": {"backing"},
    # (The key is not needed to show the header, which is all trioconv reads of one.)
    "luks": {"key-secret"},
}
_PROTOCOL_OPTIONS: dict[str, set[str]] = {
    "file": {"filename", "locking", "aio", "aio-max-batch", "drop-cache", "x-check-cache-dropped"},
    "nbd": {
        "filename",
        "server.type",
        "server.host",
        "server.port",
        "server.path",
        "host",
        "port",
        "path",
        "export",
        "tls-creds",
        "tls-hostname",
        "reconnect-delay",
        "open-timeout",
    },
    "nfs": {
        "filename",
        "server.type",
        "server.host",
        "path",
        "user",
        "group",
        "tcp-syn-count",
        "readahead-size",
        "page-cache-size",
        "debug",
    },
    "iscsi": {
        "filename",
        "transport",
        "portal",
        "target",
        "lun",
        "user",
        "password",
        "password-secret",
        "initiator-name",
        "header-digest",
        "timeout",
    },
    "http": {
        "filename",
        "url",
        "username",
        "password-secret",
        "sslverify",
        "readahead",
        "timeout",
        "cookie",
        "cookie-secret",
        "proxy-username",
        "proxy-password-secret",
    },
    "null-co": {"size", "latency-ns", "read-zeroes"},
}
_PROTOCOL_OPTIONS["host_device"] = _PROTOCOL_OPTIONS["host_cdrom"] = _PROTOCOL_OPTIONS["file"]
_PROTOCOL_OPTIONS["https"] = _PROTOCOL_OPTIONS["http"]
_PROTOCOL_OPTIONS["null-aio"] = _PROTOCOL_OPTIONS["null-co"]

_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def _qemu_size(value: str | None, key: str) -> int:
    """A QemuOpts size: a non-negative number below 2^64 with an optional suffix (a
    JSON number must be a whole one)."""
    if isinstance(value, _Number) and not value.isdigit():
        raise _Refused(f"Invalid parameter type for '{key}', expected: integer")
    try:
        result = parse_size(value or "", what=key)
    except UsageError:
        result = -1
    if not 0 <= result < 2**64:
        raise _Refused(
            f"Parameter '{key}' expects a non-negative number below 2^64 (optional suffix "
            "k, M, G, T, P or E)"
        )
    return result


def _children(flat: Mapping[str, str | None], prefix: str) -> Flat:
    """The subtree under ``prefix.`` with the prefix taken off."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in flat.items() if k.startswith(prefix + ".")}


def resolve_json(text: str, fmt: str | None = None) -> BlockSpec:
    """:func:`resolve` a ``json:`` filename."""
    return resolve(parse_json_filename(text), text, fmt)


def resolve(flat: Mapping[str, str | None], text: str, fmt: str | None = None) -> BlockSpec:
    """Resolve a flat option tree into a :class:`BlockSpec`.

    Args:
        flat: the tree (:func:`parse_image_opts`, :func:`parse_json_filename`).
        text: what the user wrote, for messages.
        fmt: a format named outside the tree (``-f``), which wins over its ``driver``
            as with qemu-img.

    Raises:
        ImageError: the tree is invalid or names what does not exist.
        UnsupportedError: a driver or option trioconv cannot honour.
    """
    try:
        return _format_node(_checked(flat), fmt, top=True)
    except _Refused as exc:
        message = f"Could not open '{text}': {exc}"
        if exc.unsupported:
            raise UnsupportedError(message) from None
        raise ImageError(message) from None


#: Options whose value must be a string (a JSON number or object there is refused).
_STRING_KEYS = {
    "driver",
    "filename",
    "path",
    "export",
    "url",
    "portal",
    "target",
    "server.type",
    "server.host",
    "server.path",
    "tls-creds",
    "tls-hostname",
    "password-secret",
    "initiator-name",
}


def _checked(flat: Mapping[str, str | None]) -> Flat:
    """The tree without ``null`` values (absent, as in QEMU; ``backing: null`` stays),
    its string options checked to be strings."""
    out: Flat = {}
    for key, value in flat.items():
        parts = key.split(".")
        if value is None and parts[-1] != "backing":
            continue
        if isinstance(value, _Number) and any(
            key == name or key.endswith("." + name) for name in _STRING_KEYS
        ):
            raise _Refused(f"Invalid parameter type for '{key}', expected: string")
        for i, part in enumerate(parts[:-1]):
            if part in ("driver", "filename"):  # an object or a list where a name goes
                where = ".".join(parts[: i + 1])
                raise _Refused(f"Invalid parameter type for '{where}', expected: string")
        out[key] = value
    return out


def _formats() -> set[str]:
    from ._open import format_info, format_names

    return {name for name in format_names() if format_info(name).open is not None}


def _format_node(flat: Flat, fmt: str | None, *, top: bool) -> BlockSpec:
    """A node whose ``driver`` is a format (or absent: probed) over its ``file`` child;
    at the top, a protocol driver stands alone (the raw bytes of that protocol)."""
    driver = fmt if fmt is not None else flat.get("driver")
    formats = _formats()
    fmt_name: str | None = None
    if driver is None:
        if "file" not in flat and not _children(flat, "file"):
            raise _Refused("Must specify either driver or file")
    elif driver in _PROTOCOLS and top:
        spec = _generic(flat, _protocol(flat, driver))
        return attrs.evolve(spec, fmt="raw")
    elif driver in formats:
        fmt_name = driver
    elif driver in _OTHER_FORMATS or driver in _OTHER_PROTOCOLS:
        kind = "format" if driver in _OTHER_FORMATS else "protocol"
        raise _Refused(f"Block {kind} '{driver}' is not supported", unsupported=True)
    else:
        raise _Refused(f"Unknown driver '{driver}'")
    known = _FORMAT_OPTIONS.get(fmt_name or "", set())
    if fmt_name is None:  # probed: any format's options may follow
        known = set().union(*_FORMAT_OPTIONS.values())
    for key in flat:
        top_key = key.split(".")[0]
        if top_key in ("file", "backing") or key in _GENERIC or key in known:
            continue
        if top_key == "overlap-check" and "overlap-check" in known:
            continue
        if top_key == "encrypt" and fmt_name in ("qcow2", None):
            continue  # only for encrypted images, which are refused when opened
        if top_key == "data-file" and fmt_name in ("qcow2", None):
            raise _Refused(
                "naming a qcow2 data file in the options is not supported (the image's "
                "own data file is used)",
                unsupported=True,
            )
        raise _Refused(f"Block format '{fmt_name or 'raw'}' does not support the option '{key}'")
    if "file" in flat:
        ref = flat["file"]
        raise _Refused(f"Cannot find device='{ref}' nor node-name='{ref}'")
    child = _children(flat, "file")
    if not child:
        raise _Refused('A block device must be specified for "file"')
    proto = child.get("driver")
    if proto is None and "filename" not in child and _children(child, "file"):
        proto_is_format = True  # a format node (probed) under this one
    else:
        proto_is_format = proto is not None and proto in formats
    if proto_is_format:
        inner = _format_node(child, None, top=False)
        base = BlockSpec(
            inner.location,
            None,
            inner.shown,
            name=inner.name,
            protocol=inner.protocol,
            inner=inner,
        )
    else:
        if proto is None:
            proto = _protocol_of(child.get("filename"))
        base = _generic(child, _protocol(child, proto))
    no_backing = False
    if "backing" in flat:
        ref = flat["backing"]
        if ref not in (None, ""):
            raise _Refused(
                f"Could not open backing file: Cannot find device='{ref}' nor node-name='{ref}'"
            )
        no_backing = True
    elif _children(flat, "backing"):
        raise _Refused(
            "a backing image given in the options is not supported (the image's own "
            "backing file is used; 'backing': null opens none)",
            unsupported=True,
        )
    strong: dict[str, object] = {}
    offset = size = None
    if "offset" in flat:
        offset = _qemu_size(flat["offset"], "offset")
        strong["offset"] = _as_given(flat["offset"])
    if "size" in flat:
        size = _qemu_size(flat["size"], "size")
        strong["size"] = _as_given(flat["size"])
        if size % 512:
            raise _Refused("Specified size is not multiple of 512")
    name = base.name
    if strong or name.startswith("json:"):
        tree: dict[str, object] = {"driver": fmt_name} if fmt_name else {}
        tree.update(strong)
        tree["file"] = _name_tree(base)
        name = _json_name(tree)
    spec = attrs.evolve(
        base, fmt=fmt_name, name=name, offset=offset or 0, size=size, no_backing=no_backing
    )
    return _generic(flat, spec)


def _name_tree(spec: BlockSpec) -> object:
    """The part of a ``json:`` name a child node contributes."""
    if spec.name.startswith("json:"):
        return json.loads(spec.name[5:])
    return {"driver": spec.protocol, "filename": spec.name}


def _json_name(tree: dict[str, object]) -> str:
    from ._qdict import qemu_order

    return "json:" + json.dumps(qemu_order(tree), separators=(", ", ": "))


def _protocol_of(filename: str | None) -> str:
    """The protocol of a ``filename`` given in block options without a ``driver``.

    Always ``file``: QEMU reads a ``scheme://`` prefix only in a plain file name, never
    in options, so ``file.filename=nbd://host/x`` names a local file of that name.
    """
    if filename is None:
        raise _Refused('A block device must be specified for "file"')
    return "file"


def _generic(node: Flat, spec: BlockSpec) -> BlockSpec:
    """Apply the options every node takes (``read-only``, ``force-share``, ...)."""

    def flag(key: str, current: bool | None) -> bool | None:
        if key not in node:
            return current
        return bool(current) or _flag(node[key], key)

    read_only = flag("read-only", spec.read_only)
    force_share = flag("force-share", spec.force_share)
    if force_share and read_only is False:
        raise _Refused("force-share=on can only be used with read-only images")
    return attrs.evolve(
        spec,
        read_only=read_only,
        force_share=force_share,
        direct=bool(flag("cache.direct", spec.direct)),
    )


def _flag(value: str | None, key: str) -> bool:
    try:
        return _bool(value, key)
    except UsageError as exc:
        raise _Refused(str(exc)) from None


def _protocol(node: Flat, proto: str) -> BlockSpec:
    """A protocol node (its own keys, ``driver`` included) as a transport location."""
    if proto in _OTHER_PROTOCOLS or proto in _OTHER_FORMATS:
        raise _Refused(f"Block protocol '{proto}' is not supported", unsupported=True)
    if proto not in _PROTOCOLS:
        raise _Refused(f"Unknown driver '{proto}'")
    allowed = _PROTOCOL_OPTIONS[proto] | _GENERIC
    for key in node:
        if key not in allowed:
            raise _Refused(f"Block protocol '{proto}' doesn't support the option '{key}'")
    if proto in ("file", "host_device", "host_cdrom"):
        spec = _file_node(node, proto)
    elif proto == "nbd":
        spec = _nbd_node(node)
    elif proto == "nfs":
        spec = _nfs_node(node)
    elif proto == "iscsi":
        spec = _iscsi_node(node)
    elif proto in ("null-co", "null-aio"):
        spec = _null_node(node, proto)
    else:
        spec = _http_node(node, proto)
    return attrs.evolve(spec, protocol=proto, name=spec.name or spec.shown)


def _need(node: Flat, key: str, message: str) -> str:
    value = node.get(key)
    if value is None or value == "":
        raise _Refused(message)
    return value


def _file_node(node: Flat, proto: str) -> BlockSpec:
    name = _need(node, "filename", f"The '{proto}' block driver requires a file name")
    locking = node.get("locking", "auto")
    if locking not in ("auto", "on", "off"):
        raise _Refused(f"Parameter 'locking' does not accept value '{locking}'")
    aio = node.get("aio", "threads")
    if aio not in ("threads", "native", "io_uring"):
        raise _Refused(f"Parameter 'aio' does not accept value '{aio}'")
    # A name that looks like a URI ("nbd://x" as a file name) stays a file name.
    location = "file:" + name if _SCHEME_RE.match(name) else name
    return BlockSpec(location, None, name, locking=locking != "off")


_QEMU_UINT_RE = re.compile(r"\s*(-?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _nbd_seconds(node: Flat, key: str) -> int:
    """``open-timeout`` or ``reconnect-delay`` as QEMU 7.2 reads them: a whole number
    in C's notations (``10``, ``0x10``, ``010`` octal), a negative one wrapping round
    as unsigned 64-bit arithmetic does, then kept to its low 32 bits - the driver
    stores it in a ``uint32_t``, so ``2^32`` means 0 and ``-1`` about 136 years."""
    value = node.get(key)
    if value is None:
        return 0
    match = _QEMU_UINT_RE.fullmatch(value)
    if match is None:
        raise _Refused(f"Parameter '{key}' expects a number")
    sign, digits = match.groups()
    if digits[:2].lower() == "0x":
        number = int(digits[2:], 16)
    else:
        number = int(digits, 8) if digits.startswith("0") else int(digits)
    if number >= 2**64:
        raise _Refused(f"Parameter '{key}' expects a number")
    if sign:
        number = -number % 2**64
    return number % 2**32


def _nbd_node(node: Flat) -> BlockSpec:
    """An ``nbd`` node as a URI, and its timing options."""
    spec = _nbd_address(node)
    return attrs.evolve(
        spec,
        nbd_open_timeout=_nbd_seconds(node, "open-timeout"),
        nbd_reconnect_delay=_nbd_seconds(node, "reconnect-delay"),
    )


def _nbd_address(node: Flat) -> BlockSpec:
    query: dict[str, str] = {}
    creds_id = node.get("tls-creds")
    tls = creds_id is not None
    if creds_id is not None:
        creds = _object(creds_id, TLSCreds, "TLS credentials")
        assert isinstance(creds, TLSCreds)
        query["tls-certificates"] = creds.dir
        if not creds.verify_peer:
            query["tls-verify-peer"] = "false"
    elif "tls-hostname" in node:
        raise _Refused("tls-hostname is set but tls-creds is not")
    if node.get("tls-hostname"):
        query["tls-hostname"] = node["tls-hostname"] or ""
    filename = node.get("filename")
    if filename is not None:
        if set(node) & {"server.type", "server.host", "server.path", "host", "path", "export"}:
            raise _Refused("No extra options may be given with a filename (nbd)")
        uri = filename
        if tls and uri.startswith("nbd") and not uri.startswith("nbds"):
            uri = "nbds" + uri[3:]
        return BlockSpec(_with_query(uri, query), None, filename)
    export = node.get("export") or ""
    kind = node.get("server.type")
    host = node.get("server.host", node.get("host"))
    port = node.get("server.port", node.get("port"))
    path = node.get("server.path", node.get("path"))
    if kind is None:
        if any(key.startswith("server.") for key in node):
            raise _Refused("Parameter 'server.type' is missing")
        if host is None and path is None:
            raise _Refused("Parameter 'server' is missing")
        kind = "unix" if path is not None else "inet"  # the legacy host/port/path keys
    s = "s" if tls else ""
    quoted = urllib.parse.quote(export)
    if kind not in ("unix", "inet"):
        raise _Refused(f"Parameter 'server.type' does not accept value '{kind}'")
    unexpected = ("server.host", "server.port") if kind == "unix" else ("server.path",)
    for key in unexpected:
        if key in node:
            raise _Refused(f"Parameter '{key.split('.')[1]}' is unexpected")
    if kind == "unix":
        if path is None:
            raise _Refused("Parameter 'server.path' is missing")
        if tls and "tls-verify-peer" not in query and not node.get("tls-hostname"):
            # A certificate names a host; a socket path names none (qemu refuses too).
            raise _Refused("No hostname for certificate validation")
        query = {"socket": path, **query}
        uri = f"nbd{s}+unix:///{quoted}"
    elif kind == "inet":
        if host is None:
            raise _Refused("Parameter 'server.host' is missing")
        bracketed = f"[{host}]" if ":" in host else host
        uri = f"nbd{s}://{bracketed}:{port or 10809}/{quoted}"
    else:
        raise _Refused(f"Parameter 'server.type' does not accept value '{kind}'")
    shown = _with_query(uri, {"socket": path} if kind == "unix" and path else {})
    return BlockSpec(_with_query(uri, query), None, shown)


def _with_query(uri: str, query: Mapping[str, str]) -> str:
    if not query:
        return uri
    sep = "&" if "?" in uri else "?"
    return uri + sep + urllib.parse.urlencode(query, safe="/")


def _nfs_node(node: Flat) -> BlockSpec:
    query: dict[str, str] = {}
    for key, name in (("user", "uid"), ("group", "gid")):
        if key in node:
            value = node[key] or ""
            if not value.isdigit():
                raise _Refused(f"Parameter '{key}' expects a number")
            query[name] = value
    filename = node.get("filename")
    if filename is not None:
        return BlockSpec(_with_query(filename, query), None, filename)
    kind = _need(node, "server.type", "Parameter 'server.type' is missing")
    if kind != "inet":
        raise _Refused(f"Parameter 'server.type' does not accept value '{kind}'")
    host = _need(node, "server.host", "Parameter 'server.host' is missing")
    path = _need(node, "path", "Parameter 'path' is missing")
    bracketed = f"[{host}]" if ":" in host else host
    uri = f"nfs://{bracketed}{urllib.parse.quote(path if path.startswith('/') else '/' + path)}"
    return BlockSpec(_with_query(uri, query), None, uri)


def _iscsi_node(node: Flat) -> BlockSpec:
    transport = node.get("transport", "tcp")
    if transport == "iser":
        raise _Refused("iSCSI over RDMA (transport=iser) is not supported", unsupported=True)
    if transport != "tcp":
        raise _Refused(f"Parameter 'transport' does not accept value '{transport}'")
    digest = node.get("header-digest") or "none-crc32c"
    if digest.lower() not in ("none", "none-crc32c", "crc32c-none"):
        raise _Refused(
            f"header-digest={digest} is not supported (trioconv sends no digests)",
            unsupported=True,
        )
    query: dict[str, str] = {}
    if node.get("initiator-name"):
        query["initiator-name"] = node["initiator-name"] or ""
    user = node.get("user")
    password = None
    if "password-secret" in node:
        if not user:
            raise _Refused("password-secret is set but no user")
        secret = _object(node["password-secret"] or "", Secret, "secret")
        assert isinstance(secret, Secret)
        password = secret.value
    elif "password" in node:  # (QEMU 7.2 still takes it in the clear)
        if not user:
            raise _Refused("password is set but no user")
        password = node["password"] or ""
    elif user:
        raise _Refused(f"CHAP user '{user}' given without password-secret")
    # The credentials go beside the URL, not in it: the URL's own are taken as written.
    chap = (user, password or "") if user else None
    timeout = None
    if node.get("timeout"):
        value = node["timeout"] or ""
        if not value.isascii() or not value.isdigit():
            raise _Refused("Parameter 'timeout' expects a number")
        timeout = float(value) or math.inf  # (0: no limit, as QEMU)
    filename = node.get("filename")
    if filename is not None:
        return BlockSpec(_with_query(filename, query), None, filename, timeout=timeout, chap=chap)
    portal = _need(node, "portal", "Parameter 'portal' is missing")
    target = _need(node, "target", "Parameter 'target' is missing")
    lun = node.get("lun", "0") or "0"
    if not lun.isdigit():
        raise _Refused("Parameter 'lun' expects a number")
    shown = f"iscsi://{portal}/{target}/{lun}"
    uri = f"iscsi://{portal}/{urllib.parse.quote(target)}/{lun}"
    return BlockSpec(_with_query(uri, query), None, shown, timeout=timeout, chap=chap)


def _null_node(node: Flat, proto: str) -> BlockSpec:
    size = _qemu_size(node["size"], "size") if "size" in node else NULL_SIZE
    latency = node.get("latency-ns", "0") or "0"
    try:
        latency_ns = int(latency, 0)
    except ValueError:
        raise _Refused("Parameter 'latency-ns' expects a number") from None
    if latency_ns < 0:
        raise _Refused("latency-ns is invalid")
    zeroes = "read-zeroes" in node and _flag(node["read-zeroes"], "read-zeroes")
    # QEMU names the device by its options when they change what it holds (size,
    # read-zeroes), and "null-co://" otherwise.
    strong: dict[str, object] = {
        key: _as_given(node[key]) for key in ("size", "read-zeroes") if key in node
    }
    name = _json_name({"driver": proto, **strong}) if strong else f"{proto}://"
    options = NullOptions(size=size, read_zeroes=zeroes, latency_ns=latency_ns)
    return BlockSpec(f"{proto}://", None, name, name=name, null=options)


def _http_node(node: Flat, proto: str) -> BlockSpec:
    url = node.get("url") or node.get("filename")
    if not url:
        raise _Refused("curl block driver requires an 'url' option")
    verify = "sslverify" not in node or _flag(node["sslverify"], "sslverify")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != proto:
        raise _Refused(f"{proto} driver cannot open the URL '{url}'")
    user = node.get("username")
    if "password-secret" in node or user:
        secret = None
        if "password-secret" in node:
            found = _object(node["password-secret"] or "", Secret, "secret")
            assert isinstance(found, Secret)
            secret = found.value
        userinfo = urllib.parse.quote(user or "", safe="")
        if secret is not None:
            userinfo += ":" + urllib.parse.quote(secret, safe="")
        host = parts.netloc.rpartition("@")[2]
        url = urllib.parse.urlunsplit(
            (parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment)
        )
    shown = node.get("url") or node.get("filename") or url
    timeout = None
    if "timeout" in node:
        value = (node["timeout"] or "").strip()
        digits = value[1:] if value.startswith("-") else value
        if not digits.isascii() or not digits.isdigit():
            raise _Refused("Parameter 'timeout' expects a number")
        # QEMU reads it unsigned: a negative number is a huge one. 0 is no limit.
        if value.startswith("-") or int(digits) > HTTP_TIMEOUT_MAX:
            raise _Refused("timeout parameter is too large or negative")
        timeout = float(digits) or math.inf
    if "readahead" in node:
        # Checked as QEMU checks it; it has no effect here: each read asks for its bytes.
        try:
            readahead = parse_size(node["readahead"] or "", what="readahead")
        except UsageError:
            raise _Refused(
                "Parameter 'readahead' expects a non-negative number below 2^64"
            ) from None
        if readahead % 512:
            raise _Refused(f"HTTP_READAHEAD_SIZE {readahead} is not a multiple of 512")
    cookie = node.get("cookie")
    if "cookie-secret" in node:
        if cookie is not None:
            raise _Refused("curl driver cannot handle both cookie and cookie secret")
        found = _object(node["cookie-secret"] or "", Secret, "secret")
        assert isinstance(found, Secret)
        cookie = found.value
    if cookie is not None and any(c in cookie for c in "\r\n\0"):
        raise _Refused("The HTTP cookie must be one line")
    proxy_user = node.get("proxy-username")
    proxy_password = None
    if "proxy-password-secret" in node:
        found = _object(node["proxy-password-secret"] or "", Secret, "secret")
        assert isinstance(found, Secret)
        proxy_password = found.value
        proxy_user = proxy_user or ""
    return BlockSpec(
        url,
        None,
        shown,
        tls_verify=verify,
        timeout=timeout,
        cookie=cookie,
        proxy_user=proxy_user,
        proxy_password=proxy_password,
    )
