"""NBD: a native Trio client for the Network Block Device protocol.

``_proto`` is the protocol without I/O; ``_client`` drives it over a Trio stream.
"""

from ._client import MultiConnDriver as MultiConnDriver
from ._client import NBDAddress as NBDAddress
from ._client import NBDDriver as NBDDriver
from ._client import is_nbd_uri as is_nbd_uri
from ._client import open_nbd as open_nbd
from ._client import parse_nbd_uri as parse_nbd_uri
