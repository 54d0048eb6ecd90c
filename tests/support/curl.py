"""Running curl through a SOCKS5 proxy (or directly) and hashing what arrives.

The response body is streamed from curl's stdout into sha256 as it arrives, so a 100 MiB
download costs no disk and little memory; small bodies are also kept for assertions.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from .tools import clean_env, require_tool

KEEP_BODY = 1 << 20  # bodies up to this size are kept in CurlResult.body
_STATUS = re.compile(r"^CURL_HTTP_CODE=(\d{3})$", re.MULTILINE)


@dataclass
class CurlResult:
    argv: list[str]
    returncode: int
    stderr: str
    sha256: str
    size: int
    body: bytes | None  # None when larger than KEEP_BODY
    http_code: int | None  # None when no HTTP response arrived

    def json(self):
        assert self.body is not None, "body too large to keep"
        return json.loads(self.body)

    def text(self) -> str:
        assert self.body is not None, "body too large to keep"
        return self.body.decode("utf-8", "replace")

    def check(self, status: int = 200) -> CurlResult:
        """Assert that curl succeeded with HTTP ``status``; returns self."""
        assert self.returncode == 0 and self.http_code == status, (
            f"curl failed: exit {self.returncode}, HTTP {self.http_code}\n"
            f"argv: {' '.join(self.argv)}\nstderr: {self.stderr}")
        return self


def curl(url: str, *, socks: str | None = None, remote_dns: bool = True,
         proxy_user: str | None = None, upload: str | None = None, method: str | None = None,
         timeout: float = 120.0, extra: Sequence[str] = ()) -> CurlResult:
    """Run curl for ``url``.

    socks       ``host:port`` of a SOCKS5 proxy; ``remote_dns`` picks --socks5-hostname (the
                proxy resolves names) or --socks5 (curl resolves them and sends an address)
    proxy_user  ``user:password`` for SOCKS5 username/password authentication
    upload      a file path, sent as the request body with ``--data-binary @file`` (POST unless
                ``method`` says otherwise)
    """
    exe = require_tool("curl")
    argv = [exe, "--silent", "--show-error", "--max-time", str(int(timeout)),
            "--write-out", "%{stderr}\nCURL_HTTP_CODE=%{http_code}\n"]
    if socks is not None:
        argv += ["--socks5-hostname" if remote_dns else "--socks5", socks]
        if proxy_user is not None:
            argv += ["--proxy-user", proxy_user]
    else:
        argv += ["--noproxy", "*"]
    if upload is not None:
        argv += ["--data-binary", f"@{upload}", "-H", "Content-Type: application/octet-stream"]
    if method is not None:
        argv += ["--request", method]
    argv += list(extra)
    argv.append(url)

    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=clean_env())
    err_chunks: list[bytes] = []
    err_reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    err_reader.start()
    h = hashlib.sha256()
    size = 0
    kept = bytearray()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    try:
        while True:
            n = proc.stdout.readinto(view)
            if not n:
                break
            h.update(view[:n])
            if size + n <= KEEP_BODY:
                kept += view[:n]
            size += n
        returncode = proc.wait(timeout + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err_reader.join(10)
        proc.stdout.close()
        proc.stderr.close()
    stderr = b"".join(err_chunks).decode("utf-8", "replace")
    m = _STATUS.search(stderr)
    code = int(m.group(1)) if m else None
    stderr = _STATUS.sub("", stderr).strip()
    return CurlResult(argv=argv, returncode=returncode, stderr=stderr, sha256=h.hexdigest(),
                      size=size, body=bytes(kept) if size <= KEEP_BODY else None,
                      http_code=code or None)
