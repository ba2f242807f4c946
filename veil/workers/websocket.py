"""Network workers over websockets: the server a data owner runs, the client a data scientist uses.

See ``websocket_server`` (serving, sessions, audit), ``websocket_client`` (the
synchronous client worker), ``websocket_auth`` (tokens and roles) and
``websocket_admin`` (the owner's remote view).
"""

from veil.workers.websocket_auth import TokenTable, new_token
from veil.workers.websocket_client import WebsocketClientWorker
from veil.workers.websocket_server import WebsocketServerWorker

__all__ = ["TokenTable", "WebsocketClientWorker", "WebsocketServerWorker", "new_token"]
