"""docs/deploy.md against the manifests and the sources: the messages it
quotes are the ones the programs print, the files it names exist, and the
deployment page's checks are there."""

import re

import pytest

from conftest import K8S, ROOT

DOC = ROOT / "docs" / "deploy.md"

# Fragments of messages quoted in the troubleshooting section, each of which
# must appear verbatim in the Rust sources.
MESSAGES = [
    "reading the kernel BTF (/sys/kernel/btf/vmlinux) failed: ",
    "; a kernel built with CONFIG_DEBUG_INFO_BTF=y is required",
    "opening the perf ring of CPU ",
    "check perf_event_paranoid, RLIMIT_MEMLOCK and that the agent has CAP_PERFMON",
    "check the agent's RBAC (list and watch pods)",
    "is automountServiceAccountToken disabled?",
    "pod metadata for node ",
    "not ready: buffer holds ",
]


def sources():
    text = []
    for crate in ("src", "core/src", "probes/src", "agent/src", "aggregator/src", "transport/src"):
        for p in (ROOT / crate).rglob("*.rs"):
            text.append(p.read_text(encoding="utf-8"))
    # Join Rust string continuations ("...\<newline>   ...").
    return re.sub(r"\\\n\s*", "", "\n".join(text))


@pytest.fixture(scope="module")
def doc():
    return DOC.read_text(encoding="utf-8")


@pytest.mark.parametrize("message", MESSAGES)
def test_quoted_message_is_printed_by_aperture(doc, message):
    assert message in re.sub(r"\s+", " ", doc), "docs/deploy.md no longer quotes it"
    assert message in sources(), "the programs no longer print this; update docs/deploy.md"


def test_page_checks_are_documented(doc):
    assert "kubectl logs -n aperture -l app=aperture-agent" in doc
    assert "kubectl exec -n aperture -it deploy/aperture-aggregator -- \\\n  curl http://localhost:9090/api/health" in doc
    assert "push_total_ok > 0" in doc
    assert "kubectl apply -k deploy/k8s" in doc


def test_push_total_ok_is_in_the_health_answer():
    health = (ROOT / "aggregator" / "src" / "http" / "health.rs")
    assert '"push_total_ok"' in health.read_text(encoding="utf-8")


def test_named_files_exist(doc):
    for path in set(re.findall(r"deploy/(?:k8s|docker|tests)/[\w.*-]+[\w*]|deploy/check\.sh", doc)):
        if path.endswith("secret.yml"):
            continue  # made by the user
        assert (ROOT / path).exists() or list(ROOT.glob(path)), path


def test_every_manifest_is_described(doc):
    for p in sorted(K8S.glob("*.y*ml")):
        assert p.name in doc, p.name


def test_every_capability_is_explained_in_the_docs(doc):
    import yaml
    ds = next(d for d in yaml.safe_load_all((K8S / "agent-daemonset.yml").read_text()) if d and d["kind"] == "DaemonSet")
    caps = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
    for cap in caps:
        assert f"| `{cap}` |" in doc, cap


def test_env_tables_match_the_manifests(doc):
    import yaml
    from conftest import all_docs, container, env_of, find
    docs = all_docs()
    for kind, name, cname in (("Deployment", "aperture-aggregator", "aggregator"), ("DaemonSet", "aperture-agent", "agent")):
        for var in env_of(container(find(kind, name, docs), cname)):
            assert f"| `{var}` |" in doc, var


PREFLIGHT = ROOT / "probes" / "src" / "preflight.rs"

# Start of each start-up check's message, as docs/deploy.md quotes it.
PREFLIGHT_MESSAGES = {
    "KernelTooOld": "is older than 5.10, the oldest Aperture supports; run the agent on nodes with Linux 5.10 or newer",
    "KernelUnknown": "cannot tell the kernel version from release ",
    "NoBtf": "is missing: the kernel was built without BTF (CONFIG_DEBUG_INFO_BTF=y), which Aperture needs",
    "NoTracefs": "tracefs is not mounted at ",
    "MissingPrivileges": "missing privileges: effective capabilities ",
    "PerfParanoid": "which forbids system-wide sampling for this process; ",
}


def preflight_source():
    text = PREFLIGHT.read_text(encoding="utf-8") if PREFLIGHT.exists() else ""
    if "enum PreflightError" not in text:
        pytest.skip("probes/src/preflight.rs has no PreflightError yet")
    return text


def test_preflight_messages_are_quoted(doc):
    src = preflight_source()
    flat = re.sub(r"\s+", " ", doc)
    for variant, fragment in PREFLIGHT_MESSAGES.items():
        assert variant in src, f"PreflightError::{variant} is gone; update docs/deploy.md"
        assert fragment in src, f"the {variant} message changed; update docs/deploy.md"
        assert fragment in flat, f"docs/deploy.md does not quote the {variant} message"


def test_preflight_exit_codes_are_documented(doc):
    src = preflight_source()
    codes = dict(re.findall(r"PreflightError::(\w+) \{ \.\. \} => (\d+)", src))
    assert set(codes) == set(PREFLIGHT_MESSAGES), "a start-up check was added or removed; update docs/deploy.md"
    table = dict(re.findall(r"^\| (\d+) \| [^|]+ \| `([^`]+)`", doc, re.M))
    for variant, code in codes.items():
        assert code in table, f"exit code {code} ({variant}) is not in the table of docs/deploy.md"
        assert TABLE_WORDS[variant] in table[code], f"exit code {code} ({variant}) is documented as: {table[code]}"


TABLE_WORDS = {
    "KernelTooOld": "older than 5.10",
    "KernelUnknown": "cannot tell the kernel version",
    "NoBtf": "without BTF",
    "NoTracefs": "tracefs is not mounted",
    "MissingPrivileges": "missing privileges",
    "PerfParanoid": "perf_event_paranoid is",
}
