"""Idempotent installation of what the benchmark needs.

- Debian packages for the load tools and the C peers (apt-get, only when a tool is
  missing, only when apt-get is there and we are root or have password-less sudo).
- One virtualenv per Python peer under ``benchmarks/.work/`` with the pinned release,
  and one for the chart (matplotlib). A stamp file in each venv records what was
  installed, so a second run does nothing.

Nothing here raises on a failed install: callers get a note explaining what is missing
and skip the systems that need it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"

# tool -> Debian package that provides it
APT_PACKAGES = {
    "nginx": "nginx-light",
    "hey": "hey",
    "curl": "curl",
    "socat": "socat",
    "ss-server": "shadowsocks-libev",
    "ss-local": "shadowsocks-libev",
    "microsocks": "microsocks",
}

# name -> pip requirements of its venv
VENVS = {
    "pywssocks": ["pywssocks==1.5.1"],
    "linksocks": ["linksocks==1.8.9"],
    "bench": ["matplotlib>=3.8,<4"],
}


@dataclass
class InstallLog:
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        print(f"  [install] {text}", flush=True)
        self.notes.append(text)


def which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    # /usr/sbin is not always on PATH for non-login shells
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        cand = Path(d) / tool
        if cand.exists() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def _sudo_prefix() -> list[str] | None:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        ok = subprocess.run(["sudo", "-n", "true"], capture_output=True,
                            check=False).returncode == 0
        if ok:
            return ["sudo", "-n"]
    return None


def ensure_apt_tools(tools: list[str], log: InstallLog, logdir: Path) -> dict[str, str | None]:
    """Install the Debian packages for the missing tools; return tool -> path or None."""
    missing = [t for t in tools if which(t) is None]
    if missing:
        pkgs = sorted({APT_PACKAGES.get(t, t) for t in missing})
        prefix = _sudo_prefix()
        if not shutil.which("apt-get"):
            log.note(f"missing {', '.join(missing)} and no apt-get here: cannot install {pkgs}")
        elif prefix is None:
            log.note(f"missing {', '.join(missing)}; not root and no password-less sudo")
        else:
            log.note(f"apt-get install {' '.join(pkgs)} (missing: {', '.join(missing)})")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            logdir.mkdir(parents=True, exist_ok=True)
            with open(logdir / "apt.log", "ab") as out:
                subprocess.run(prefix + ["apt-get", "update", "-qq"], stdout=out, check=False,
                               stderr=subprocess.STDOUT, env=env, timeout=600)
                rc = subprocess.run(prefix + ["apt-get", "install", "-y", "-qq",
                                              "--no-install-recommends", *pkgs],
                                    stdout=out, stderr=subprocess.STDOUT, env=env,
                                    timeout=900, check=False).returncode
            if rc != 0:
                log.note(f"apt-get install failed (exit {rc}); see {logdir / 'apt.log'}")
            # Debian starts services on install where it may; we want none running.
            _stop_package_services(prefix, pkgs)
    found = {t: which(t) for t in tools}
    for t, path in found.items():
        if path is None:
            log.note(f"{t} is not available")
    return found


def _stop_package_services(prefix: list[str], pkgs: list[str]) -> None:
    services = {"nginx-light": "nginx", "shadowsocks-libev": "shadowsocks-libev"}
    for pkg in pkgs:
        svc = services.get(pkg)
        if svc and shutil.which("systemctl"):
            subprocess.run(prefix + ["systemctl", "stop", svc], capture_output=True, timeout=30,
                           check=False)


def venv_dir(name: str) -> Path:
    return WORK / f"venv-{name}"


def venv_python(name: str) -> Path:
    return venv_dir(name) / "bin" / "python"


def ensure_venv(name: str, log: InstallLog, logdir: Path) -> Path | None:
    """Create ``.work/venv-NAME`` with its pinned requirements; return its python or None."""
    reqs = VENVS[name]
    vdir = venv_dir(name)
    py = venv_python(name)
    stamp = vdir / ".bench-installed"
    want = "\n".join(reqs) + "\n"
    if py.exists() and stamp.exists() and stamp.read_text() == want:
        return py
    log.note(f"creating {vdir.relative_to(HERE.parent)} with {' '.join(reqs)}")
    logdir.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    with open(logdir / f"pip-{name}.log", "ab") as out:
        try:
            if not py.exists():
                subprocess.run([base, "-m", "venv", str(vdir)], check=True, stdout=out,
                               stderr=subprocess.STDOUT, timeout=300)
            subprocess.run([str(py), "-m", "pip", "install", "--quiet",
                            "--disable-pip-version-check", *reqs],
                           check=True, stdout=out, stderr=subprocess.STDOUT, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            log.note(f"could not install {' '.join(reqs)}: {exc}; see {logdir}/pip-{name}.log")
            return None
    stamp.write_text(want)
    return py


def pip_version(name: str, package: str) -> str | None:
    py = venv_python(name)
    if not py.exists():
        return None
    out = subprocess.run([str(py), "-c",
                          f"import importlib.metadata as m; print(m.version({package!r}))"],
                         capture_output=True, text=True, timeout=60, check=False)
    return out.stdout.strip() or None


if __name__ == "__main__":
    lg = InstallLog()
    ensure_apt_tools(sorted(APT_PACKAGES), lg, WORK / "logs")
    for n in VENVS:
        print(n, ensure_venv(n, lg, WORK / "logs"))
