"""The management plane: users with quotas, tokens, stats, events, health, metrics, the
REST API (a quart-trio app served by hypercorn in the server's process) and persistence.

Layout:

``plane.py``      :class:`Management`: wires the services below over one state, runs the
                  server, the flusher and the enforcer
``state.py``      the one state (token table, users, events, store, lock) and what every
                  service needs of it
``tunnel.py``     the Protocol of what the plane may ask of the tunnel server
``users.py``      the user API;  ``tokens.py``  the LinkSocks-compatible token API
``subscribe.py``  what /api/subscribe answers;  ``access.py``  who may call the API
``observe.py``    server events, stats, events, health;  ``metrics.py``  /metrics
``loops.py``      restore, counter flushes, enforcement of expiry and limits
``errors.py``     the services' refusals (app.py maps them to HTTP)
``model.py``      meters (the accounts the data path charges), users, SOCKS5 credentials
``records.py``    tokens and users as the store's rows
``store.py``      the store interface and its SQLite implementation (one server per file)
``dates.py``      the range every date must be in, and safe conversions of stored times
``events.py``     the event log
``keys.py``       API key formats and checks, the per-address failure limit
``schemas.py``    every request and response body (msgspec Structs)
``operations.py`` what an endpoint is; ``routes_*.py`` the endpoints; ``registry.py`` the table
``app.py``        the quart-trio app built from the table
``openapi.py``    /api/openapi.json from the same table and Structs
``serving.py``    hypercorn on the tunnel's own connections, or on --api-bind
"""

from .keys import ApiKey
from .memory_store import MemoryStore
from .plane import Management
from .store import SQLiteStore, Store, StoreError, default_path

__all__ = ["ApiKey", "Management", "MemoryStore", "SQLiteStore", "Store", "StoreError", "default_path"]
