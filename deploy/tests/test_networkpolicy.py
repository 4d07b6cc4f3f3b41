"""The NetworkPolicies of networkpolicy.yml, evaluated: which connections
between the agent, the aggregator, ClickHouse and the rest of the world they
allow, by the rules of the NetworkPolicy API (a pod selected by a policy of a
direction accepts only what some policy of that direction allows; a
connection needs the sender's egress and the receiver's ingress)."""

import pytest

from conftest import all_docs, container, find, load_docs

NS = "aperture"

# Pods by the labels their workloads give them; OUTSIDE is anything not in
# the namespace (Prometheus, an ingress controller, a person's client,
# another namespace's pod, the internet).
WORKLOADS = {
    "agent": ("DaemonSet", "aperture-agent", "agent"),
    "aggregator": ("Deployment", "aperture-aggregator", "aggregator"),
    "clickhouse": ("StatefulSet", "clickhouse", "clickhouse"),
}
OUTSIDE = "outside"


@pytest.fixture(scope="module")
def world():
    docs = all_docs()
    labels = {name: find(kind, wname, docs)["spec"]["template"]["metadata"]["labels"]
              for name, (kind, wname, _) in WORKLOADS.items()}
    policies = [d for d in load_docs("networkpolicy.yml")]
    assert policies and all(p["kind"] == "NetworkPolicy" for p in policies)
    return labels, policies


def selects(selector, labels):
    if selector.get("matchExpressions"):
        raise NotImplementedError("matchExpressions")
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def peer_matches(peer, who, labels):
    """A `from`/`to` entry against a pod of this namespace or OUTSIDE."""
    if "ipBlock" in peer:
        return who == OUTSIDE
    if "namespaceSelector" in peer:
        raise NotImplementedError("namespaceSelector")
    return who != OUTSIDE and selects(peer["podSelector"], labels[who])


def port_matches(rule, port, proto):
    ports = rule.get("ports")
    if not ports:
        return True
    return any(p.get("port") in (None, port) and p.get("protocol", "TCP") == proto for p in ports)


def allows(policies, labels, direction, pod, peer, port, proto):
    """Whether `pod` lets `peer` through in `direction` (Ingress: peer -> pod,
    Egress: pod -> peer). OUTSIDE is not isolated by these policies."""
    if pod == OUTSIDE:
        return True
    mine = [p for p in policies if selects(p["spec"]["podSelector"], labels[pod])
            and direction in p["spec"].get("policyTypes", ["Ingress"])]
    if not mine:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for p in mine:
        for rule in p["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(peer_matches(x, peer, labels) for x in peers)) and port_matches(rule, port, proto):
                return True
    return False


def connects(world, src, dst, port, proto="TCP"):
    labels, policies = world
    return (allows(policies, labels, "Egress", src, dst, port, proto)
            and allows(policies, labels, "Ingress", dst, src, port, proto))


ALLOWED = [
    ("agent", "aggregator", 50051, "UDP"),   # QUIC
    ("agent", "aggregator", 50051, "TCP"),   # gRPC fallback
    ("aggregator", "clickhouse", 8123, "TCP"),
    (OUTSIDE, "aggregator", 9090, "TCP"),    # Prometheus, UI, API
    (OUTSIDE, "agent", 9091, "TCP"),         # Prometheus
    ("agent", OUTSIDE, 443, "TCP"),          # the API server
    ("agent", OUTSIDE, 6443, "TCP"),
    ("agent", OUTSIDE, 53, "UDP"),
    ("aggregator", OUTSIDE, 53, "UDP"),
    ("aggregator", OUTSIDE, 53, "TCP"),
    ("clickhouse", OUTSIDE, 53, "UDP"),
]

DENIED = [
    (OUTSIDE, "aggregator", 50051, "UDP"),   # only agents push
    (OUTSIDE, "aggregator", 50051, "TCP"),
    ("clickhouse", "aggregator", 50051, "TCP"),
    (OUTSIDE, "clickhouse", 8123, "TCP"),    # only the aggregator queries
    ("agent", "clickhouse", 8123, "TCP"),
    ("aggregator", "clickhouse", 9000, "TCP"),  # the native port is unused
    (OUTSIDE, "clickhouse", 9000, "TCP"),
    ("aggregator", OUTSIDE, 443, "TCP"),     # the aggregator calls nothing else
    ("aggregator", OUTSIDE, 8123, "TCP"),
    ("clickhouse", OUTSIDE, 443, "TCP"),     # nor does ClickHouse
    ("clickhouse", "aggregator", 9090, "TCP"),
    (OUTSIDE, "agent", 22, "TCP"),
    (OUTSIDE, "aggregator", 22, "TCP"),
]


@pytest.mark.parametrize("src,dst,port,proto", ALLOWED, ids=[f"{s}->{d}:{p}/{t}" for s, d, p, t in ALLOWED])
def test_allowed(world, src, dst, port, proto):
    assert connects(world, src, dst, port, proto)


@pytest.mark.parametrize("src,dst,port,proto", DENIED, ids=[f"{s}->{d}:{p}/{t}" for s, d, p, t in DENIED])
def test_denied(world, src, dst, port, proto):
    assert not connects(world, src, dst, port, proto)


def test_default_deny_covers_every_pod_both_ways(world):
    _, policies = world
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1
    assert set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny[0]["spec"].get("ingress") and not deny[0]["spec"].get("egress")


def test_every_workload_has_its_own_policy(world):
    """checkov's CKV2_K8S_6 counts only policies with matchLabels."""
    labels, policies = world
    for name in WORKLOADS:
        assert any(p["spec"]["podSelector"].get("matchLabels") and selects(p["spec"]["podSelector"], labels[name])
                   for p in policies), name


def test_policy_ports_are_container_ports():
    """A renamed or moved port must move in the policies too."""
    docs = all_docs()
    policies = load_docs("networkpolicy.yml")
    for name, (kind, wname, cname) in WORKLOADS.items():
        w = find(kind, wname, docs)
        cports = {(p["containerPort"], p.get("protocol", "TCP")) for p in container(w, cname)["ports"]}
        wlabels = w["spec"]["template"]["metadata"]["labels"]
        for p in policies:
            if p["spec"]["podSelector"].get("matchLabels") and selects(p["spec"]["podSelector"], wlabels):
                for rule in p["spec"].get("ingress") or []:
                    for port in rule.get("ports") or []:
                        assert (port["port"], port.get("protocol", "TCP")) in cports, (name, port)


def test_the_agent_is_not_on_the_host_network():
    """A NetworkPolicy does not apply to a hostNetwork pod, and the
    aggregator's agent rule selects pod addresses: both need the agent on the
    pod network."""
    ds = find("DaemonSet", "aperture-agent", all_docs())
    assert not ds["spec"]["template"]["spec"].get("hostNetwork", False)


def test_evaluator_control(world):
    """The evaluator is not permissive by construction: with no policies
    everything connects; a deny-all policy blocks."""
    labels, _ = world
    assert connects((labels, []), OUTSIDE, "clickhouse", 9000)
    deny = [{"spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}]
    assert not connects((labels, deny), "agent", "aggregator", 50051, "UDP")
