"""Sans-IO core: bytes in, events out. The WebSocket frame codec (compiled ``_relay`` and its
pure twin ``_relay_py``, chosen by ``codec``), the LinkSocks messages (``protocol``), SOCKS5
(``socks5``) and host names (``names``). Nothing here imports Trio or touches a socket."""
