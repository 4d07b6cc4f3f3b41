"""The configurations shipped in the ConfigMaps parse with Aperture's own
loader (`aperture check-config`), with the environment the manifests set."""

import pytest
import yaml

from conftest import all_docs, container, env_of, find, run_binary

CASES = [
    ("agent", "aperture-agent", "agent.yml", "DaemonSet", "aperture-agent", "agent"),
    ("aggregator", "aperture-aggregator", "aggregator.yml", "Deployment", "aperture-aggregator", "aggregator"),
]


def manifest_env(c):
    """The container's environment as Kubernetes would set it: literal
    values, a dummy for each Secret key, a node name for the downward API."""
    out = {}
    for name, e in env_of(c).items():
        if "value" in e:
            out[name] = str(e["value"])
        elif "secretKeyRef" in e.get("valueFrom", {}):
            out[name] = "dummy-" + e["valueFrom"]["secretKeyRef"]["key"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            out[name] = "node-1"
        else:
            pytest.fail(f"unhandled env source for {name}: {e}")
    return out


def extract(tmp_path, cm_name, key):
    cm = find("ConfigMap", cm_name, all_docs())
    path = tmp_path / key
    path.write_text(cm["data"][key], encoding="utf-8")
    return path


@pytest.mark.parametrize("which,cm,key,kind,name,cname", CASES, ids=[c[0] for c in CASES])
def test_configmap_parses_with_aperture(tmp_path, which, cm, key, kind, name, cname):
    path = extract(tmp_path, cm, key)
    env = manifest_env(container(find(kind, name, all_docs()), cname))
    r = run_binary(["check-config", which, "--config", str(path)], env)
    assert r.returncode == 0, f"check-config {which} failed ({r.returncode}): {r.stderr}"
    assert "configuration ok" in r.stdout


@pytest.mark.parametrize("which,cm,key,kind,name,cname", CASES, ids=[c[0] for c in CASES])
def test_configmap_alone_is_valid_yaml_mapping(which, cm, key, kind, name, cname):
    data = yaml.safe_load(find("ConfigMap", cm, all_docs())["data"][key])
    assert isinstance(data, dict) and data


def test_loader_rejects_a_bad_value(tmp_path):
    """Control: the harness sees a configuration error (exit code 2)."""
    path = extract(tmp_path, "aperture-agent", "agent.yml")
    env = manifest_env(container(find("DaemonSet", "aperture-agent", all_docs()), "agent"))
    env["APERTURE_MODE"] = "gpu"
    r = run_binary(["check-config", "agent", "--config", str(path)], env)
    assert r.returncode == 2 and "APERTURE_MODE" in r.stderr


def test_aggregator_needs_the_token_from_the_secret(tmp_path):
    """Without APERTURE_AUTH_TOKEN (the Secret) the aggregator refuses to start."""
    path = extract(tmp_path, "aperture-aggregator", "aggregator.yml")
    env = manifest_env(container(find("Deployment", "aperture-aggregator", all_docs()), "aggregator"))
    del env["APERTURE_AUTH_TOKEN"]
    r = run_binary(["check-config", "aggregator", "--config", str(path)], env)
    assert r.returncode == 2 and "auth.token" in r.stderr
