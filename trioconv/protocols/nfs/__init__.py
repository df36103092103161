"""NFS: a native Trio client for NFSv3 files, ``nfs://host[:port]/export/path/file``.

``_xdr`` and ``_rpc`` are XDR and ONC RPC without I/O, ``_proto`` the PORTMAP, MOUNT and
NFSv3 procedures, ``_client`` drives them over Trio TCP streams. As with libnfs and
QEMU, ``?uid=N&gid=N`` set the AUTH_SYS identity (the caller's by default).
"""

from ._client import NFSAddress as NFSAddress
from ._client import NFSDriver as NFSDriver
from ._client import create_nfs_file as create_nfs_file
from ._client import is_nfs_uri as is_nfs_uri
from ._client import open_nfs as open_nfs
from ._client import parse_nfs_uri as parse_nfs_uri
from ._client import remove_nfs_file as remove_nfs_file

__all__ = [
    "NFSAddress",
    "NFSDriver",
    "create_nfs_file",
    "is_nfs_uri",
    "open_nfs",
    "parse_nfs_uri",
    "remove_nfs_file",
]
