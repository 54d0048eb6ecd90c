"""A real nginx for tests: a configuration of the test's own (its site inside an ``http``
block with every path under ``prefix``), checked with ``nginx -t``, run in the foreground."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .procs import ManagedProcess, ProcessFactory
from .tools import require_tool


def start_nginx(procs: ProcessFactory, prefix: Path, site: str, port: int,
                extra: str = "") -> ManagedProcess:
    """nginx serving ``site`` (server blocks; ``extra``: more http-level lines), once ``port``
    accepts."""
    nginx = require_tool("nginx")
    prefix.mkdir(parents=True, exist_ok=True)
    user_line = "user root root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user_line}
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{extra}
{site}
}}
""")
    checked = subprocess.run([nginx, "-t", "-p", str(prefix), "-c", str(conf)],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    proc = procs.start([nginx, "-p", str(prefix), "-c", str(conf)], name="nginx")
    proc.wait_for_port(port)
    return proc
