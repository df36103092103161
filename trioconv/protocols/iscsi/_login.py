"""iSCSI login (RFC 7143 section 6, 13) as a state machine without I/O.

A login is a conversation of Login Request / Login Response PDUs carrying text
``key=value`` pairs, in stages:

* **SecurityNegotiation** (stage 0): the initiator names itself and the target and
  offers ``AuthMethod``; with CHAP, the target sends a challenge (``CHAP_I``, ``CHAP_C``)
  and the initiator answers ``CHAP_N`` (user) and ``CHAP_R`` = MD5(id, secret,
  challenge).
* **LoginOperationalNegotiation** (stage 1): both sides agree on the session's numbers
  - how large a data segment each side accepts (declared, not negotiated), burst sizes,
  whether write data may go unsolicited (``InitialR2T``, ``ImmediateData``).
* **FullFeaturePhase** (stage 3): SCSI commands may flow.

Each PDU may ask to *transit* (T bit) to the next stage; the stage changes when the
target's response has T set. :class:`Login` produces the requests and consumes the
responses; ``_client`` only moves bytes. The agreed values end up in :class:`Params`.
"""

from __future__ import annotations

import hashlib
import os

import attrs

from ._pdu import BHS, MAX_SEGMENT, encode_login

__all__ = [
    "Login",
    "LoginError",
    "Params",
    "chap_response",
    "decode_text",
    "encode_text",
]

#: The longest login text (all the PDUs of one response together) taken from a target.
MAX_TEXT = 64 * 1024
#: MaxRecvDataSegmentLength during login (RFC 7143 13.12: 8192 until negotiated).
LOGIN_SEGMENT = 8192

SECURITY = 0
OPERATIONAL = 1
FULL_FEATURE = 3

#: What this initiator proposes in LoginOperationalNegotiation. MaxRecvDataSegmentLength
#: is declarative: it is how large a data segment *we* accept (Data-In PDUs).
PROPOSALS: dict[str, str] = {
    "HeaderDigest": "None",
    "DataDigest": "None",
    "MaxConnections": "1",
    "InitialR2T": "No",
    "ImmediateData": "Yes",
    "MaxRecvDataSegmentLength": "262144",
    "MaxBurstLength": "16776192",
    "FirstBurstLength": "262144",
    "DefaultTime2Wait": "2",
    "DefaultTime2Retain": "0",
    "MaxOutstandingR2T": "1",
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
    "ErrorRecoveryLevel": "0",
}

# How each negotiated key combines the two offers (RFC 7143 section 13).
_MIN_KEYS = ("MaxConnections", "MaxBurstLength", "FirstBurstLength", "MaxOutstandingR2T",
             "ErrorRecoveryLevel", "DefaultTime2Retain")  # fmt: skip
_MAX_KEYS = ("DefaultTime2Wait",)
_OR_KEYS = ("InitialR2T", "DataPDUInOrder", "DataSequenceInOrder")
_AND_KEYS = ("ImmediateData",)
_RESERVED_VALUES = ("Irrelevant", "NotUnderstood", "Reject")
_DECLARED = ("TargetAlias", "TargetPortalGroupTag", "TargetAddress", "MaxRecvDataSegmentLength")

# Login status classes and details (RFC 7143 section 11.13.5).
_STATUS = {
    (1, 1): "the target moved temporarily",
    (1, 2): "the target moved permanently",
    (2, 0): "initiator error",
    (2, 1): "authentication failed (wrong CHAP user or password?)",
    (2, 2): "the initiator is not authorized to log in to this target",
    (2, 3): "target not found (wrong IQN?)",
    (2, 4): "the target has been removed",
    (2, 5): "unsupported iSCSI version",
    (2, 6): "too many connections",
    (2, 7): "missing parameter",
    (2, 8): "cannot include the connection in the session",
    (2, 9): "session type not supported",
    (2, 10): "session does not exist",
    (2, 11): "invalid request during login",
    (3, 0): "target error",
    (3, 1): "the target service is unavailable",
    (3, 2): "the target is out of resources",
}


class LoginError(Exception):
    """The login failed: the target refused it or the conversation went wrong.

    Attributes:
        status_class / status_detail: the target's login status, when it sent one.
        redirect: for a redirection (status class 1), where to log in instead: the
            ``TargetAddress`` as ``(host, port)``.
    """

    def __init__(
        self,
        message: str,
        status_class: int = 0,
        status_detail: int = 0,
        redirect: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_class = status_class
        self.status_detail = status_detail
        self.redirect = redirect


def parse_target_address(value: str) -> tuple[str, int]:
    """``host[:port][,portal-group]`` (an IPv6 host in brackets) as ``(host, port)``.

    Raises:
        LoginError: the address is malformed.
    """
    address = value.split(",", 1)[0].strip()
    port = 3260
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise LoginError(f"malformed TargetAddress {value[:64]!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = address.partition(":")
    try:
        if port_text:
            port = int(port_text)
    except ValueError:
        raise LoginError(f"malformed TargetAddress {value[:64]!r}") from None
    if not host or not 0 < port < 65536:
        raise LoginError(f"malformed TargetAddress {value[:64]!r}")
    return host, port


def encode_text(pairs: dict[str, str]) -> bytes:
    """``key=value\\0`` for each pair, in order."""
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs.items())


def decode_text(data: bytes) -> dict[str, str]:
    """The pairs of a text data segment (later duplicates win).

    Raises:
        LoginError: a pair without ``=``, or text that is not UTF-8.
    """
    pairs: dict[str, str] = {}
    for item in data.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep:
            raise LoginError(f"malformed text key {item[:64]!r}")
        try:
            pairs[key.decode()] = value.decode()
        except UnicodeDecodeError:
            raise LoginError(f"text key {key[:64]!r} is not UTF-8") from None
    return pairs


def _decode_binary(value: str) -> bytes:
    """An iSCSI binary value: ``0x`` hex or ``0b`` base64."""
    import base64
    import binascii

    try:
        if value[:2].lower() == "0x":
            text = value[2:]
            return bytes.fromhex(text if len(text) % 2 == 0 else "0" + text)
        if value[:2].lower() == "0b":
            return base64.b64decode(value[2:], validate=True)
    except (ValueError, binascii.Error):
        pass
    raise LoginError(f"malformed binary value {value[:64]!r}")


def chap_response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    """CHAP with MD5 (RFC 1994): MD5 of the identifier byte, the secret and the challenge."""
    return hashlib.md5(bytes((ident,)) + secret + challenge, usedforsecurity=False).digest()


@attrs.frozen
class Params:
    """The session's operational values after login.

    Attributes:
        max_send_segment: the largest data segment we may send (the target's declared
            MaxRecvDataSegmentLength; 8192 when it declares none).
        max_recv_segment: the largest data segment the target may send us.
    """

    max_send_segment: int = 8192
    max_recv_segment: int = 8192
    max_burst: int = 262144
    first_burst: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    tsih: int = 0
    target_alias: str = ""


def _as_int(key: str, value: str) -> int:
    try:
        # Decimal or 0x hex (RFC 7143 6.1); int() would also take "1_000" and " 1 ".
        if "_" in value or value != value.strip():
            raise ValueError(value)
        number = int(value, 0)
    except ValueError:
        raise LoginError(f"the target sent {key}={value[:32]}, not a number") from None
    if number < 0:
        raise LoginError(f"the target sent {key}={value[:32]}")
    return number


def _as_bool(key: str, value: str) -> bool:
    if value not in ("Yes", "No"):
        raise LoginError(f"the target sent {key}={value[:32]}, not Yes or No")
    return value == "Yes"


class Login:
    """The initiator's side of one login, as a state machine.

    ::

        login = Login(initiator, target, isid)
        request = login.start()
        while request is not None:
            send(request); header, data = receive()
            request = login.receive(header, data)
        params = login.params

    Args:
        initiator_name / target_name: IQNs (``InitiatorName`` and ``TargetName``).
        isid: the 6-byte initiator session id.
        chap: ``(user, secret)`` to authenticate with CHAP, or None for no
            authentication.
        itt: the task tag the login PDUs carry.
    """

    def __init__(
        self,
        initiator_name: str,
        target_name: str,
        isid: bytes,
        *,
        chap: tuple[str, str] | None = None,
        itt: int = 0,
        proposals: dict[str, str] | None = None,
    ) -> None:
        self.initiator_name = initiator_name
        self.target_name = target_name
        self.isid = isid
        self.chap = chap
        self.itt = itt
        self.proposals = dict(PROPOSALS if proposals is None else proposals)
        self.stage = SECURITY
        self.cmd_sn = 0
        self.max_cmd_sn = 0
        self.exp_stat_sn = 0
        self.tsih = 0
        self.params = Params()
        self._received: dict[str, str] = {}
        self._pending_text = b""
        self._chap_step = 0
        self._done = False
        self._operational_sent = False

    @property
    def done(self) -> bool:
        """True once the target has moved the session to full feature phase."""
        return self._done

    def _pdu(self, pairs: dict[str, str], nsg: int, transit: bool = True) -> bytes:
        return encode_login(
            isid=self.isid,
            tsih=self.tsih,
            itt=self.itt,
            cid=0,
            cmd_sn=self.cmd_sn,
            exp_stat_sn=self.exp_stat_sn,
            csg=self.stage,
            nsg=nsg,
            transit=transit,
            text=encode_text(pairs),
        )

    def start(self) -> bytes:
        """The first Login Request."""
        first = {
            "InitiatorName": self.initiator_name,
            "SessionType": "Normal",
            "TargetName": self.target_name,
            "AuthMethod": "CHAP,None" if self.chap else "None",
        }
        if self.chap:
            return self._pdu(first, OPERATIONAL, transit=False)
        return self._pdu(first, OPERATIONAL)

    def receive(self, header: BHS, data: bytes) -> bytes | None:
        """Take a Login Response; return the next request, or None when logged in.

        Raises:
            LoginError: the target refused the login, or broke the conversation.
        """
        if header.status_class != 0:
            key = (header.status_class, header.status_detail)
            text = _STATUS.get(key) or _STATUS.get((key[0], 0), "login refused")
            redirect = None
            if header.status_class == 1:
                address = decode_text(data).get("TargetAddress")
                if address is None:
                    text = f"{text}, but the target did not say where"
                else:
                    redirect = parse_target_address(address)
                    text = f"{text} to {address}"
            raise LoginError(
                f"{text} (login status 0x{key[0]:02x}{key[1]:02x})", key[0], key[1], redirect
            )
        self.exp_stat_sn = (header.stat_sn + 1) & 0xFFFFFFFF
        self.cmd_sn = header.exp_cmd_sn
        self.max_cmd_sn = header.max_cmd_sn
        if header.tsih:
            self.tsih = header.tsih
        if len(self._pending_text) + len(data) > MAX_TEXT:
            raise LoginError(f"the target's login text is longer than {MAX_TEXT} bytes")
        self._pending_text += data
        if header.more_text:  # the target's text continues in its next response
            return self._pdu({}, self.stage, transit=False)
        pairs = decode_text(self._pending_text)
        self._pending_text = b""
        self._received.update(pairs)
        if header.csg != self.stage:
            raise LoginError(
                f"the target answered for login stage {header.csg} in stage {self.stage}"
            )
        if self.stage == SECURITY:
            return self._security(header, pairs)
        if self.stage == OPERATIONAL:
            return self._operational(header, pairs)
        raise LoginError(f"unexpected login response in stage {self.stage}")

    # -- stage 0 -----------------------------------------------------------------------
    def _security(self, header: BHS, pairs: dict[str, str]) -> bytes | None:
        method = pairs.get("AuthMethod")
        if method == "Reject" or method == "NotUnderstood":
            raise LoginError("the target refused every authentication method offered")
        if self.chap is None:
            if method not in (None, "None"):
                raise LoginError(
                    f"the target requires authentication ({method}): give the CHAP "
                    "user and password in the URL (iscsi://user%password@host/...)"
                )
        elif method == "None" and self._chap_step == 0:
            pass  # the target does not ask for CHAP although we could do it: fine
        elif method == "CHAP" and self._chap_step == 0:
            self._chap_step = 1
            return self._pdu({"CHAP_A": "5"}, OPERATIONAL, transit=False)
        elif self._chap_step == 1:
            if pairs.get("CHAP_A") != "5":
                raise LoginError(f"the target chose CHAP_A={pairs.get('CHAP_A')}, not MD5")
            try:
                ident = int(pairs["CHAP_I"], 0)
                challenge = _decode_binary(pairs["CHAP_C"])
            except KeyError as exc:
                raise LoginError(f"the target's CHAP challenge lacks {exc}") from None
            except ValueError:
                raise LoginError("the target sent a malformed CHAP_I") from None
            if not 0 <= ident <= 255:
                raise LoginError("the target sent a malformed CHAP_I")
            user, secret = self.chap
            answer = chap_response(ident, secret.encode(), challenge)
            self._chap_step = 2
            return self._pdu({"CHAP_N": user, "CHAP_R": "0x" + answer.hex()}, OPERATIONAL)
        elif self._chap_step == 2 and not header.transit:
            raise LoginError("the target did not accept the CHAP response")
        if header.transit:
            if header.nsg == FULL_FEATURE:
                self._finish(header)
                return None
            self.stage = OPERATIONAL
            return self._send_operational()
        # The target wants more security talk we have nothing for: ask to move on.
        return self._pdu({}, OPERATIONAL)

    # -- stage 1 -----------------------------------------------------------------------
    def _send_operational(self) -> bytes:
        self._operational_sent = True
        return self._pdu(self.proposals, FULL_FEATURE)

    def _operational(self, header: BHS, pairs: dict[str, str]) -> bytes | None:
        answers: dict[str, str] = {}
        for key, value in pairs.items():
            if key in self.proposals or key in _DECLARED:
                continue
            # The target offered a key we did not: answer it (our defaults agree).
            if key in (*_MIN_KEYS, *_MAX_KEYS, *_OR_KEYS, *_AND_KEYS):
                answers[key] = value
            elif key in ("HeaderDigest", "DataDigest"):
                answers[key] = "None"
            elif key in ("IFMarker", "OFMarker"):
                answers[key] = "No"
            else:
                answers[key] = "NotUnderstood"
        if not self._operational_sent:
            return self._send_operational()
        if header.transit and header.nsg == FULL_FEATURE:
            self._finish(header)
            return None
        return self._pdu(answers, FULL_FEATURE)

    def _finish(self, header: BHS) -> None:
        got = self._received
        for key in ("HeaderDigest", "DataDigest"):
            if got.get(key, "None") != "None":
                raise LoginError(f"the target insists on {key}={got[key]}")
        if "ErrorRecoveryLevel" in got and _as_int("ErrorRecoveryLevel", got["ErrorRecoveryLevel"]):
            raise LoginError("the target insists on error recovery, which is not supported")
        mine = self.proposals

        def given(key: str) -> bool:
            # "Irrelevant" (RFC 7143 6.2: e.g. FirstBurstLength when no unsolicited data
            # can flow), "NotUnderstood" and "Reject" leave the key at its default.
            return key in got and got[key] not in _RESERVED_VALUES

        def number(key: str, default: int) -> int:
            value = _as_int(key, got[key]) if given(key) else default
            return min(value, int(mine.get(key, value)))

        def flag(key: str, default: bool, combine_or: bool) -> bool:
            theirs = _as_bool(key, got[key]) if given(key) else default
            ours = mine.get(key, "Yes" if default else "No") == "Yes"
            return (theirs or ours) if combine_or else (theirs and ours)

        max_burst = number("MaxBurstLength", 262144)
        params = Params(
            # (RFC 7143 13.12: at most 2**24 - 1, all a PDU's length field can say)
            max_send_segment=min(
                _as_int("MaxRecvDataSegmentLength", got["MaxRecvDataSegmentLength"]), MAX_SEGMENT
            )
            if "MaxRecvDataSegmentLength" in got
            else 8192,
            max_recv_segment=int(mine.get("MaxRecvDataSegmentLength", "8192")),
            max_burst=max_burst,
            first_burst=min(number("FirstBurstLength", 65536), max_burst),
            initial_r2t=flag("InitialR2T", True, combine_or=True),
            immediate_data=flag("ImmediateData", True, combine_or=False),
            max_outstanding_r2t=max(1, number("MaxOutstandingR2T", 1)),
            data_pdu_in_order=flag("DataPDUInOrder", True, combine_or=True),
            data_sequence_in_order=flag("DataSequenceInOrder", True, combine_or=True),
            tsih=header.tsih,
            target_alias=got.get("TargetAlias", ""),
        )
        if params.max_send_segment < 512 or params.max_burst < 512 or params.first_burst < 512:
            raise LoginError("the target negotiated a data segment or burst below 512 bytes")
        self.params = params
        self.stage = FULL_FEATURE
        self._done = True
        return None


def new_isid() -> bytes:
    """A random-format ISID (type 10b in the top bits), different for every session."""
    rest = os.urandom(5)
    return bytes((0x80,)) + rest
