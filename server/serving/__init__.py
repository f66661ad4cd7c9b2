"""Our HTTP serving: Hypercorn's protocols, our connections, accept loops and deadlines.

:func:`serve` runs ASGI apps on listening sockets until told to stop. Connection handling
is ours (:mod:`.connection`) because Hypercorn 0.18's own lets one abandoned request end
the process; the HTTP/1.1 and HTTP/2 protocol work is still Hypercorn's (:mod:`.protocol`).
"""

from server.serving.options import ServingOptions
from server.serving.server import Endpoint, ListenError, serve

__all__ = ["Endpoint", "ListenError", "ServingOptions", "serve"]
