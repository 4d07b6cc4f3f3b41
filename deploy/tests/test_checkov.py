"""checkov (pinned in requirements.txt) on the manifests: no failed check,
and every check that is skipped is one of the exceptions docs/deploy.md
explains, skipped by an annotation that gives the reason and that still
hides a real finding."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ALL_MANIFESTS, K8S, ROOT

# Frameworks run: the Kubernetes checks, and the secret scanner (credentials
# written into a manifest).
FRAMEWORKS = ["kubernetes", "secrets"]

# The exceptions, by workload: the checks that cannot pass for it, each
# skipped with a reason in its checkov.io/skip<N> annotation. A new exception
# is a decision: add it here and to docs/deploy.md.
EXCEPTIONS = {
    "DaemonSet.aperture.aperture-agent": {
        "CKV_K8S_17",  # hostPID
        "CKV_K8S_25",  # added capabilities
        "CKV_K8S_23",  # uid 0
        "CKV_K8S_40",  # uid 0, so no high uid
        "CKV_K8S_38",  # service account token (pod watch)
        "CKV_K8S_35",  # token from an environment variable
        "CKV_K8S_43",  # image built here, no digest yet
    },
    "Deployment.aperture.aperture-aggregator": {
        "CKV_K8S_35",  # token and ClickHouse password from environment variables
        "CKV_K8S_43",  # image built here, no digest yet
    },
    "StatefulSet.aperture.clickhouse": {
        "CKV_K8S_43",  # release line tag, digest is the registry's
    },
}

SKIP_PREFIX = "checkov.io/skip"


def copy_manifests(dest):
    """The manifests in git (secret.example.yml standing for secret.yml), not
    a secret.yml made from it in this checkout."""
    dest.mkdir()
    for name in ALL_MANIFESTS + ["kustomization.yaml"]:
        shutil.copy(K8S / name, dest / name)
    return dest


def run_checkov(directory):
    env = dict(os.environ)
    env["CKV_SKIP_PACKAGE_UPDATE_CHECK"] = "true"  # no query to PyPI
    r = subprocess.run([sys.executable, "-m", "checkov.main", "--directory", str(directory),
                        "--framework", *FRAMEWORKS, "--skip-download", "--output", "json", "--compact"],
                       cwd=directory, env=env, capture_output=True, text=True, timeout=600)
    # Exit code 1 means failed checks, which the callers look at; anything
    # else without JSON output means checkov itself failed.
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov exited with {r.returncode} and no JSON report:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    reports = out if isinstance(out, list) else [out]
    return [rep for rep in reports if "summary" in rep]


def checks(reports, kind):
    return [c for rep in reports for c in rep.get("results", {}).get(f"{kind}_checks", [])]


def describe(c):
    return f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return run_checkov(copy_manifests(tmp_path_factory.mktemp("checkov") / "k8s"))


def test_no_failed_check(reports):
    failed = checks(reports, "failed")
    assert not failed, "checkov finds:\n" + "\n".join(describe(c) for c in failed)
    for rep in reports:
        assert rep["summary"]["parsing_errors"] == 0, rep["summary"]
    # It did look at the manifests: every workload was checked.
    k8s = next(rep for rep in reports if rep["check_type"] == "kubernetes")
    assert k8s["summary"]["passed"] > 100, k8s["summary"]
    checked = {c["resource"] for c in checks(reports, "passed")}
    assert set(EXCEPTIONS) <= checked


def test_skips_are_the_documented_exceptions(reports):
    skipped = {}
    for c in checks(reports, "skipped"):
        skipped.setdefault(c["resource"], set()).add(c["check_id"])
        reason = c.get("check_result", {}).get("suppress_comment", "")
        assert len(reason) > 40, f"{describe(c)}: skipped without a real reason ({reason!r})"
    assert skipped == EXCEPTIONS


def test_exceptions_are_documented():
    doc = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    start = doc.index("## Hardening and its exceptions")
    end = doc.find("\n## ", start + 1)
    section = doc[start:end if end != -1 else len(doc)]
    for check_ids in EXCEPTIONS.values():
        for check_id in check_ids:
            assert check_id in section, f"{check_id} is not explained in docs/deploy.md"


def skip_annotations(doc):
    ann = doc.get("metadata", {}).get("annotations") or {}
    return {k: v for k, v in ann.items() if k.startswith(SKIP_PREFIX)}


def test_skip_annotations_parse():
    """checkov splits an annotation at "=" into check id and reason: one "="
    only, or checkov fails on the manifest."""
    seen = 0
    for name in ALL_MANIFESTS:
        for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")):
            for key, value in skip_annotations(doc or {}).items():
                seen += 1
                check_id, sep, reason = value.partition("=")
                assert sep and "=" not in reason, f"{name} {key}: {value}"
                assert check_id.startswith("CKV"), f"{name} {key}: {value}"
    assert seen == sum(len(v) for v in EXCEPTIONS.values())


def test_every_skip_hides_a_finding_and_the_gate_fails(tmp_path):
    """Control: without the skip annotations, and with a real credential in
    the directory, checkov fails exactly the excepted checks and finds the
    credential. So no skip is stale, and a finding does fail the check."""
    d = copy_manifests(tmp_path / "k8s")
    for name in ALL_MANIFESTS:
        docs = list(yaml.safe_load_all((d / name).read_text(encoding="utf-8")))
        for doc in docs:
            ann = (doc or {}).get("metadata", {}).get("annotations")
            if ann:
                for key in list(skip_annotations(doc)):
                    del ann[key]
                if not ann:
                    del doc["metadata"]["annotations"]
        (d / name).write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    subprocess.run(["bash", str(K8S / "gen-secret.sh"), str(d / "secret.yml")], check=True, capture_output=True)

    reports = {rep["check_type"]: rep for rep in run_checkov(d)}
    assert not checks(reports.values(), "skipped")
    failed = {}
    for c in checks([reports["kubernetes"]], "failed"):
        failed.setdefault(c["resource"], set()).add(c["check_id"])
    assert failed == EXCEPTIONS
    assert "secrets" in reports and checks([reports["secrets"]], "failed"), \
        "the secret scanner did not flag the generated token and password"
