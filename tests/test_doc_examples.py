"""Every shell, Python and JavaScript example in README.md and docs/*.md runs, and exits 0,
against a live gateway: `quota-gw serve` on real Redis and Postgres with the example config,
the sync worker and the demo upstream. Docs whose examples do not run are wrong docs.

Fenced blocks tagged `bash`, `sh` or `shell` run in `bash -e -o pipefail`, `python` in this
interpreter, `js` or `mjs` in `node` (skipped when node is not installed). Other tags (yaml,
ts, nginx, json, text, ...) are not programs. Directives are HTML comments on the lines right
above a fence, invisible when the page is rendered:

    <!-- docs-test: skip REASON -->             never run here (say why; keep these few)
    <!-- docs-test: pending FEATURE NOTE -->    needs a feature of a branch not merged yet
    <!-- docs-test: requires NAME -->           skipped when NAME is missing: a Python module for
                                                python blocks, a command for shell blocks
    <!-- docs-test: expect 'TEXT' -->           stdout must contain TEXT as well

Each block gets the variables the docs tell readers to set: QUOTA_GW_URL, QUOTA_GW_KEY (a key
of an org on plan `pro`, one org per document, so a page's examples share a balance as a reader's
would) and QUOTA_GW_ADMIN_TOKEN; and REDIS_URL, DATABASE_URL, QUOTA_GW_PREFIX, QUOTA_GW_CONFIG
for the command-line examples. It runs in a folder laid out like the repository after
`make dev`: `.quota-gw/demo-key`, `.quota-gw/admin-token` and `examples/`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from conftest import ADMIN_TOKEN, ROOT
from quota_gw.embedded import free_port

# docs/benchmarks.md is left out: its commands are the long benchmark runs, with their results.
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "benchmarks.md")]
RUNNERS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "js": "node", "mjs": "node"}
DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(\w+)\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(```+)\s*([\w.+-]*)")


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}-{self.lang}"


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a Markdown file with the directives right above each."""
    lines = doc.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        directives: dict[str, str] = {}
        j = i - 1
        while j >= 0 and (d := DIRECTIVE.match(lines[j])):
            directives.setdefault(d.group(1), d.group(2))
            j -= 1
        end = i + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        out.append(Block(doc, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", directives))
        i = end + 1
    return out


ALL = [b for doc in DOCS for b in blocks(doc)]
RUNNABLE = [b for b in ALL if b.lang in RUNNERS]


def test_directives_are_known_and_skips_say_why():
    for b in ALL:
        for name, arg in b.directives.items():
            assert name in ("skip", "pending", "requires", "expect"), f"{b.id}: unknown directive {name}"
            assert arg, f"{b.id}: `{name}` needs an argument (a reason, a feature, a module or a text)"
        assert b.lang in RUNNERS or not b.directives, f"{b.id}: a directive on a block that never runs"


class Live:
    """The gateway, worker and demo upstream the examples run against."""

    def __init__(self, tmp: Path, redis_url: str, database_url: str) -> None:
        self.tmp, self.redis_url, self.database_url = tmp, redis_url, database_url
        self.prefix = "qgwdocs" + secrets.token_hex(4)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.orgs: dict[Path, tuple[str, str]] = {}
        up_port, gw_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{gw_port}"
        self.config = tmp / "quota-gw.yaml"
        self.config.write_text((ROOT / "examples" / "quota-gw.yaml").read_text()
                               .replace("127.0.0.1:9100", f"127.0.0.1:{up_port}"))
        self.env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url,
                    "QUOTA_GW_PREFIX": self.prefix, "QUOTA_GW_CONFIG": str(self.config),
                    "QUOTA_GW_ADMIN_TOKEN": ADMIN_TOKEN, "QUOTA_GW_SPOOL_DIR": str(tmp / "spool"),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        cli = [sys.executable, "-m", "quota_gw.cli"]
        self.start(cli + ["demo-upstream", "--port", str(up_port), "--log-level", "warning"])
        self.start(cli + ["serve", "--port", str(gw_port), "--log-level", "warning"])
        self.start(cli + ["worker", "--consumer", "docs-test", "--block-ms", "100", "--log-level", "warning"])
        self.wait(f"http://127.0.0.1:{up_port}/v1/models", any_status=True)
        self.wait(f"{self.url}/readyz")

    def start(self, cmd: list[str]) -> None:
        self.procs.append(subprocess.Popen(cmd, env=self.env, cwd=self.tmp, stdin=subprocess.DEVNULL))

    def wait(self, url: str, any_status: bool = False) -> None:
        deadline = time.monotonic() + 60
        while True:
            for p in self.procs:
                assert p.poll() is None, f"{p.args} exited with {p.returncode}"
            try:
                if any_status or httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{url} did not answer"
            time.sleep(0.1)

    def org_for(self, doc: Path) -> tuple[str, str]:
        """One org on plan pro per document, and its consume+read key."""
        if doc not in self.orgs:
            org = f"docs-{doc.stem.lower()}-{secrets.token_hex(3)}"
            h = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            with httpx.Client(base_url=self.url, headers=h, timeout=10) as c:
                r = c.post("/v1/admin/orgs", json={"org_id": org, "plan": "pro"})
                assert r.status_code == 201, r.text
                r = c.post(f"/v1/admin/orgs/{org}/keys", json={"scopes": ["consume", "read"]})
                assert r.status_code == 201, r.text
            self.orgs[doc] = (org, r.json()["key"])
        return self.orgs[doc]

    def workdir(self, key: str) -> Path:
        """A folder laid out like the repository after `make dev`."""
        d = self.tmp / f"run-{secrets.token_hex(4)}"
        (d / ".quota-gw").mkdir(parents=True)
        (d / ".quota-gw" / "demo-key").write_text(key + "\n")
        (d / ".quota-gw" / "admin-token").write_text(ADMIN_TOKEN + "\n")
        (d / "examples").symlink_to(ROOT / "examples")
        return d

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        r = redis.Redis.from_url(self.redis_url)
        for k in r.scan_iter(match=f"{self.prefix}:*", count=1000):
            r.delete(k)
        r.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, redis_url: str, own_database_url: str) -> Any:
    # A database of its own: the docs run `quota-gw reconcile`, which checks every org in it.
    gw = Live(tmp_path_factory.mktemp("docs"), redis_url, own_database_url)
    try:
        yield gw
    finally:
        gw.close()


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_doc_example_runs(block: Block, live: Live) -> None:
    d = block.directives
    if "skip" in d:
        pytest.skip(d["skip"])
    if "pending" in d:
        pytest.skip(f"pending {d['pending']}: remove the marker once it is merged")
    runner = RUNNERS[block.lang]
    if "requires" in d:
        need = d["requires"]
        missing = importlib.util.find_spec(need) is None if runner == "python" else shutil.which(need) is None
        if missing:
            pytest.skip(f"needs {need}, which is not installed")
    if runner == "node" and shutil.which("node") is None:
        pytest.skip("node is not installed")
    _, key = live.org_for(block.doc)
    cwd = live.workdir(key)
    env = {**live.env, "QUOTA_GW_URL": live.url, "QUOTA_GW_KEY": key, "QUOTA_GW_ADMIN_TOKEN": ADMIN_TOKEN}
    script = cwd / {"bash": "example.sh", "python": "example.py", "node": "example.mjs"}[runner]
    script.write_text(block.code)
    cmd = {"bash": ["bash", "-e", "-o", "pipefail", str(script)], "python": [sys.executable, str(script)],
           "node": ["node", str(script)]}[runner]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    shown = f"{block.id} exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    print(shown)  # shown with -rP
    assert p.returncode == 0, shown
    if "expect" in d:
        text = d["expect"]
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        assert text in p.stdout, f"{block.id}: {text!r} not in the output\n{shown}"
