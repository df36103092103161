"""HTTP(S): images on web servers, read with byte ranges - ``http(s)://host/path``.

``_proto`` builds requests and decodes response heads without I/O; ``_client`` reads
over a pool of keep-alive Trio connections (TLS for ``https://``).
"""

from ._client import HTTPAddress as HTTPAddress
from ._client import HTTPDriver as HTTPDriver
from ._client import is_http_uri as is_http_uri
from ._client import open_http as open_http
from ._client import parse_http_uri as parse_http_uri

__all__ = ["HTTPAddress", "HTTPDriver", "is_http_uri", "open_http", "parse_http_uri"]
