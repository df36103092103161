"""iSCSI: a native Trio initiator for LUNs, ``iscsi://[user%password@]host[:port]/iqn/lun``.

``_pdu`` encodes and decodes iSCSI PDUs, ``_login`` is the login negotiation (with CHAP)
and ``_scsi`` the SCSI block commands and their replies - all without I/O; ``_client``
drives them over a Trio TCP connection with many commands in flight.
"""

from ._client import ISCSIAddress as ISCSIAddress
from ._client import ISCSIDriver as ISCSIDriver
from ._client import is_iscsi_uri as is_iscsi_uri
from ._client import open_iscsi as open_iscsi
from ._client import parse_iscsi_uri as parse_iscsi_uri

__all__ = ["ISCSIAddress", "ISCSIDriver", "is_iscsi_uri", "open_iscsi", "parse_iscsi_uri"]
