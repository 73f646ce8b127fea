"""The docs stay true to the code: the config reference is regenerated when a config field
changes, the API reference names every route the app serves, the metrics the operations page
tells people to alert on exist, and every link points at something inside the repository.
(The examples themselves run in test_doc_examples.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel
from starlette.routing import Route

from conftest import ROOT, test_config_data
from quota_gw import config as config_mod

DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_config_ref  # noqa: E402


def test_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == gen_config_ref.render(), (
        "docs/config.md is not current: run `python scripts/gen_config_ref.py` and commit it")


def test_config_reference_check_mode_exits_1_when_stale(tmp_path, monkeypatch):
    stale = tmp_path / "config.md"
    stale.write_text(gen_config_ref.render().replace("## `behaviour`", "## `behavior`"))
    monkeypatch.setattr(gen_config_ref, "OUT", stale)
    monkeypatch.setattr(gen_config_ref, "ROOT", tmp_path)
    assert gen_config_ref.main(["--check"]) == 1
    assert gen_config_ref.main([]) == 0 and gen_config_ref.main(["--check"]) == 0


def test_config_reference_script_runs_as_documented():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_ref.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    seen.add(model)
    for f in model.model_fields.values():
        for _, sub in gen_config_ref.models_in(f.annotation):
            if sub not in seen:
                _models(sub, seen)
    return seen


def test_every_config_field_has_a_description():
    missing = [f"{m.__name__}.{n}" for m in _models(config_mod.Config, set())
               for n, f in m.model_fields.items() if not (f.description or "").strip()]
    assert not missing, f"add Field(description=...) to {missing}, then run scripts/gen_config_ref.py"


def test_minimal_config_in_the_reference_is_valid():
    text = (ROOT / "docs" / "config.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    import yaml

    cfg = config_mod.parse(yaml.safe_load(block), "docs/config.md")
    assert cfg.default_plan == "free"


def _norm(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_api_reference_names_every_route():
    from quota_gw.app import create_app

    data = test_config_data()
    data["routes"] = []  # proxy prefixes are the operator's, not the API's
    app = create_app(config_mod.parse(data))
    text = _norm((ROOT / "docs" / "api.md").read_text())
    missing = []
    for r in app.routes:
        if not isinstance(r, Route):
            continue
        path = _norm(r.path)
        methods = sorted((r.methods or {"GET"}) - {"HEAD"})
        if len(methods) > 3:  # any method (authorize's path form): the path is what is documented
            ok = path in text
        else:
            ok = all(f"{m} {path}" in text for m in methods)
        if not ok:
            missing.append(f"{'|'.join(methods)} {r.path}")
    assert not missing, f"docs/api.md does not document: {missing}"


def _metric_names() -> set[str]:
    from quota_gw import metrics, sidecar  # noqa: F401 - the sidecar registers its counters
    from sync_worker import health

    names: set[str] = set()
    for registry in (metrics.REGISTRY, health.REGISTRY):
        for family in registry.collect():
            names |= {family.name, family.name + "_total", *(s.name for s in family.samples)}
    return names


def test_metrics_named_in_the_docs_exist():
    known = _metric_names()
    named = {m for doc in DOCS for m in re.findall(r"\b(?:quota_gw|qgw_worker)_[a-z_]+[a-z]", doc.read_text())}
    assert named, "the operations page should name metrics to alert on"
    assert not named - known, f"the docs name metrics the code does not have: {sorted(named - known)}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    s = re.sub(r"<[^>]+>", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_links_stay_inside_the_repository_and_resolve(doc: Path):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"https?://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.is_relative_to(ROOT), f"{doc.name}: link outside the repository: {target}"
        assert dest.exists(), f"{doc.name}: broken link: {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{doc.name}: no heading for #{anchor} in {dest.name}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_no_internal_vocabulary(doc: Path):
    text = doc.read_text()
    for phrase in ("SPEC.md", "../shared", "full size", "the seed", "the contract", "issues show"):
        assert phrase.lower() not in text.lower(), f"{doc.name} says {phrase!r}"
    assert not re.search(r"\bissue\s*#?\d+", text, re.I), f"{doc.name} refers to an issue number"


def test_readme_starts_with_the_two_commands():
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.strip()]
    fence = next(i for i, ln in enumerate(lines) if ln.startswith("```"))
    assert lines[0] == "# quota-gw" and fence <= 2
    assert lines[fence + 1].startswith("make dev") and lines[fence + 2].startswith("make test")


def test_typescript_example_says_what_the_javascript_one_runs():
    """The TypeScript client is shown, the JavaScript one runs (test_doc_examples.py); they must
    call the same routes with the same fields and messages."""
    text = (ROOT / "docs" / "integrate.md").read_text()
    ts = re.search(r"```ts\n(.*?)```", text, re.S).group(1)
    js = re.search(r"```js\n(.*?)```", text, re.S).group(1).split("// Demonstration")[0]

    def literals(code: str) -> list[str]:
        # strings (paths, headers, messages) and the API's snake_case field names
        return sorted(re.findall(r"\"[^\"]*\"|`[^`]*`|\b[a-z]+_[a-z_]+\b", code))

    assert literals(ts.replace("quota.ts", "quota.mjs")) == literals(js)
