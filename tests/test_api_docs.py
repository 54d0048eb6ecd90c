"""docs/api.md promises that every ``sh`` example works as pasted, in order, against
``make run``: run them all, in order, against a server started the way ``make run`` starts
it. An example whose documented answer is an error must fail; every other must succeed
(curl --fail-with-body) and, when it answers JSON, answer valid JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from .api_support import KEY, start_api_server
from .support.tools import clean_env, require_tool

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "api.md"
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.DOTALL | re.MULTILINE)


def examples() -> list[tuple[str, bool]]:
    """(script, expected to fail) for every sh block, in order."""
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(DOC.read_text())]
    out = []
    for i, (lang, body) in enumerate(blocks):
        if lang != "sh":
            continue
        answer = blocks[i + 1] if i + 1 < len(blocks) and blocks[i + 1][0] != "sh" else ("", "")
        fails = '"success":false' in answer[1] or re.search(r"HTTP/1\.1 4\d\d", answer[1]) is not None
        out.append((body, fails))
    return out


def test_every_sh_example_of_the_api_doc_works_as_pasted(procs, tmp_path):
    curl = require_tool("curl")
    work = tmp_path / "checkout"  # stands for the repository root while `make run` runs
    (work / ".run").mkdir(parents=True)
    (work / ".run" / "api-key").write_text(KEY + "\n")
    (work / ".venv").symlink_to(ROOT / ".venv")
    server = start_api_server(procs, db=work / ".run" / "trisocks.db", key=KEY, key_in_env=True,
                              tokens=["make-run-token"])
    scripts = examples()
    assert len(scripts) >= 25, "the doc lost its examples"
    failures = []
    for script, should_fail in scripts:
        script = script.replace("http://127.0.0.1:8765", server.http_url)
        prelude = f"set -e\nAPI={server.http_url}\nKEY=$(cat .run/api-key)\n"
        if not should_fail:
            prelude += f'curl() {{ "{curl}" -sS --fail-with-body "$@"; echo; }}\n'
        else:
            prelude += f'curl() {{ "{curl}" -sS "$@"; echo; }}\n'
        proc = subprocess.run(["bash", "-c", prelude + script], cwd=work, capture_output=True,
                              text=True, timeout=60, env=clean_env(), check=False)
        outcome = proc.stdout
        if should_fail:
            if '"success":false' not in outcome and " 401" not in outcome:
                failures.append(f"expected an error from:\n{script}\ngot:\n{outcome}{proc.stderr}")
            continue
        if proc.returncode != 0:
            failures.append(f"failed ({proc.returncode}):\n{script}\n{outcome}{proc.stderr}")
            continue
        for line in outcome.splitlines():
            if line.startswith("{"):
                try:
                    json.loads(line)
                except ValueError:
                    failures.append(f"not JSON from:\n{script}\n{line}")
    assert not failures, "\n\n".join(failures)
    assert shutil.which("bash")
