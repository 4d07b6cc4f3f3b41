"""Shared helpers of the deploy/ checks (run through deploy/check.sh)."""

import os
import pathlib
import re
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"

# Manifests applied by kustomization.yaml (secret.yml is made by the user from
# secret.example.yml; the tests use the example in its place).
MANIFESTS = ["namespace.yml", "networkpolicy.yml", "clickhouse.yml", "aggregator.yml", "agent-daemonset.yml"]
ALL_MANIFESTS = MANIFESTS + ["secret.example.yml"]

DNS_NAME = "aperture-aggregator.aperture.svc.cluster.local"


def load_docs(name):
    with open(K8S / name, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def all_docs():
    out = []
    for name in ALL_MANIFESTS:
        out.extend(load_docs(name))
    return out


def find(kind, name, docs=None):
    hits = [d for d in (docs if docs is not None else all_docs())
            if d.get("kind") == kind and d.get("metadata", {}).get("name") == name]
    assert len(hits) == 1, f"expected exactly one {kind} {name}, found {len(hits)}"
    return hits[0]


def container(workload, name):
    hits = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(hits) == 1, f"no container {name} in {workload['metadata']['name']}"
    return hits[0]


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def binary():
    path = os.environ.get("APERTURE_BIN") or str(ROOT / "target" / "debug" / "aperture")
    path = pathlib.Path(path)
    if not path.is_absolute():
        path = ROOT / path
    if not path.exists():
        pytest.fail(f"{path} does not exist: build it with `cargo build --locked -p aperture` "
                    "(deploy/check.sh does)")
    return str(path)


def run_binary(args, env=None):
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    base.update(env or {})
    return subprocess.run([binary(), *args], env=base, capture_output=True, text=True, timeout=60)


def documented_env_vars():
    """Environment variables docs/configuration.md lists, plus APERTURE_LOG
    (the log filter, read in src/cli.rs)."""
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    names = set(re.findall(r"`((?:APERTURE_[A-Z_]+)|NODE_NAME)`", doc))
    cli = (ROOT / "src" / "cli.rs").read_text(encoding="utf-8")
    if '"APERTURE_LOG"' in cli:
        names.add("APERTURE_LOG")
    return names


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stats = terminalreporter.stats
    passed = len(stats.get("passed", []))
    failed = len(stats.get("failed", [])) + len(stats.get("error", []))
    skipped = len(stats.get("skipped", []))
    line = f"deploy: {passed} passed, {failed} failed"
    if skipped:
        line += f", {skipped} skipped"
    terminalreporter.write_line(line)
