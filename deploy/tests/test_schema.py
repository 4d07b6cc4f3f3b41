"""Every manifest against the Kubernetes API schemas (kubernetes-validate,
strict: unknown fields are errors). The schemas ship inside the package; a
socket guard proves that nothing is downloaded."""

import socket
import subprocess

import kubernetes_validate.utils as kv
import pytest
import yaml

from conftest import ALL_MANIFESTS, K8S, ROOT, load_docs

# The page asks for Kubernetes 1.24+; the oldest schema the package ships is
# 1.25. 1.30 is the reference version; 1.37 the newest shipped.
VERSIONS = ["1.25", "1.30", "1.37"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_schemas_are_bundled():
    shipped = kv.all_versions()
    for v in VERSIONS:
        assert any(s.startswith(v + ".") for s in shipped), f"kubernetes-validate has no {v} schemas"


def cases():
    for name in ALL_MANIFESTS:
        for i, doc in enumerate(load_docs(name)):
            for v in VERSIONS:
                yield pytest.param(doc, v, id=f"{name}#{i}:{doc['kind']}/{doc['metadata']['name']}@{v}")


@pytest.mark.parametrize("doc,version", list(cases()))
def test_manifest_is_valid(doc, version):
    kv.validate(doc, version, strict=True)


def test_every_file_has_documents():
    for name in ALL_MANIFESTS:
        assert load_docs(name), f"{name} is empty"


def test_generated_secret_is_valid(tmp_path):
    out = tmp_path / "secret.yml"
    subprocess.run(["bash", str(K8S / "gen-secret.sh"), str(out)], check=True, capture_output=True)
    with open(out, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("Secret", "aperture"), ("Secret", "aperture-tls")]
    for d in docs:
        for v in VERSIONS:
            kv.validate(d, v, strict=True)
    # It never overwrites: rotating credentials is a decision.
    again = subprocess.run(["bash", str(K8S / "gen-secret.sh"), str(out)], capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr


def test_validator_catches_mistakes():
    """The validator is not a no-op: a misspelt field and a wrong type fail."""
    doc = load_docs("aggregator.yml")
    deployment = next(d for d in doc if d["kind"] == "Deployment")
    import copy

    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, "1.30", strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "one"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong, "1.30", strict=True)


def test_generated_certificate_serves_the_dns_name(tmp_path):
    """gen-secret.sh's certificate chains to its CA, is a server certificate
    for the name agents dial, and matches its key."""
    from conftest import DNS_NAME

    out = tmp_path / "secret.yml"
    subprocess.run(["bash", str(K8S / "gen-secret.sh"), str(out)], check=True, capture_output=True)
    with open(out, encoding="utf-8") as f:
        tls = [d for d in yaml.safe_load_all(f) if d][1]["stringData"]
    for k in ("ca.crt", "tls.crt", "tls.key"):
        (tmp_path / k).write_text(tls[k], encoding="utf-8")
    ok = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), "-purpose", "sslserver",
                         "-verify_hostname", DNS_NAME, str(tmp_path / "tls.crt")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"),
                          "-verify_hostname", "other.example", str(tmp_path / "tls.crt")], capture_output=True)
    assert bad.returncode != 0
    cert_pub = subprocess.run(["openssl", "x509", "-noout", "-pubkey", "-in", str(tmp_path / "tls.crt")],
                              check=True, capture_output=True).stdout
    key_pub = subprocess.run(["openssl", "pkey", "-pubout", "-in", str(tmp_path / "tls.key")],
                             check=True, capture_output=True).stdout
    assert cert_pub == key_pub
