"""The management plane: users with quotas, tokens, stats, events, health, metrics, the
REST API (a quart-trio app served by hypercorn in the server's process) and persistence.

Layout:

``plane.py``     :class:`Management`: owns the token table, users, events and store; runs
                 the server, the flusher and the enforcer
``model.py``     meters (the accounts the data path charges), users, SOCKS5 credentials
``store.py``     the store interface and its SQLite implementation (one server per file)
``dates.py``     the range every date must be in, and safe conversions of stored times
``events.py``    the event log
``keys.py``      API key formats and checks, the per-address failure limit
``schemas.py``   every request and response body (msgspec Structs)
``app.py``       the operation table and the quart-trio app; ``routes_*.py`` the endpoints
``openapi.py``   /api/openapi.json from the same table and Structs
``metrics.py``   /metrics (Prometheus text)
``serving.py``   hypercorn on the tunnel's own connections, or on --api-bind
``subscription.py``  the client side of ``trisocks client --subscribe``
"""

from .keys import ApiKey
from .plane import Management
from .store import MemoryStore, SQLiteStore, Store, StoreError, default_path

__all__ = ["ApiKey", "Management", "MemoryStore", "SQLiteStore", "Store", "StoreError", "default_path"]
