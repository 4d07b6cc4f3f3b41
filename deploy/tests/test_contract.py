"""The deployment page (shared/seeds/004, the contract) and the issue, read
back from the manifests."""

import re
import subprocess

import pytest
import yaml

from conftest import (DNS_NAME, K8S, MANIFESTS, ROOT, all_docs, container, documented_env_vars, env_of, find,
                      load_docs)


@pytest.fixture(scope="module")
def docs():
    return all_docs()


@pytest.fixture(scope="module")
def aggregator(docs):
    return find("Deployment", "aperture-aggregator", docs)


@pytest.fixture(scope="module")
def agent(docs):
    return find("DaemonSet", "aperture-agent", docs)


def pod(workload):
    return workload["spec"]["template"]["spec"]


# --- namespace -------------------------------------------------------------

def test_namespace_is_exactly_the_pages():
    assert load_docs("namespace.yml") == [{
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "aperture", "labels": {"app.kubernetes.io/part-of": "aperture"}},
    }]


def test_everything_namespaced_lives_in_aperture(docs):
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for d in docs:
        if d["kind"] not in cluster_scoped:
            assert d["metadata"].get("namespace") == "aperture", f"{d['kind']}/{d['metadata']['name']}"


# --- aggregator -------------------------------------------------------------

def test_aggregator_is_a_single_replica_deployment(aggregator):
    assert aggregator["spec"]["replicas"] == 1


def test_aggregator_container_ports(aggregator):
    ports = {(p["containerPort"], p.get("protocol", "TCP")): p["name"] for p in container(aggregator, "aggregator")["ports"]}
    assert ports == {(50051, "TCP"): "grpc", (50051, "UDP"): "quic", (9090, "TCP"): "http"}


def test_aggregator_service(docs):
    svc = find("Service", "aperture-aggregator", docs)
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert svc["spec"]["selector"] == {"app": "aperture-aggregator"}
    ports = {(p["port"], p.get("protocol", "TCP")): p["targetPort"] for p in svc["spec"]["ports"]}
    assert ports == {(50051, "TCP"): "grpc", (50051, "UDP"): "quic", (9090, "TCP"): "http"}


def test_service_selects_the_aggregator_pods(aggregator, docs):
    svc = find("Service", "aperture-aggregator", docs)
    labels = aggregator["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())


def test_aggregator_probes(aggregator):
    c = container(aggregator, "aggregator")
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 9090)


def test_prometheus_annotations(aggregator, agent):
    for workload, port in ((aggregator, "9090"), (agent, "9091")):
        ann = workload["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == port
        assert ann["prometheus.io/path"] == "/metrics"
        # Quoted strings in YAML, as annotations must be.
        assert all(isinstance(v, str) for v in ann.values())


def test_annotated_ports_are_container_ports(aggregator, agent):
    for workload in (aggregator, agent):
        port = int(workload["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
        c = pod(workload)["containers"][0]
        assert port in [p["containerPort"] for p in c["ports"] if p.get("protocol", "TCP") == "TCP"]


def test_aggregator_env(aggregator):
    env = env_of(container(aggregator, "aggregator"))
    for name in ("APERTURE_AUTH_TOKEN", "APERTURE_CLICKHOUSE_ENDPOINT", "APERTURE_CLICKHOUSE_DATABASE",
                 "APERTURE_CLICKHOUSE_PASSWORD", "APERTURE_BUFFER_CAPACITY"):
        assert name in env, name
    assert env["APERTURE_CLICKHOUSE_DATABASE"]["value"] == "aperture"
    assert env["APERTURE_CLICKHOUSE_ENDPOINT"]["value"] == "http://clickhouse.aperture.svc.cluster.local:8123"


def test_credentials_come_from_the_secret(aggregator, agent):
    checks = [(aggregator, "aggregator", "APERTURE_AUTH_TOKEN", "auth-token"),
              (aggregator, "aggregator", "APERTURE_CLICKHOUSE_PASSWORD", "clickhouse-password"),
              (agent, "agent", "APERTURE_AUTH_TOKEN", "auth-token")]
    for workload, cname, var, key in checks:
        e = env_of(container(workload, cname))[var]
        assert "value" not in e, f"{var} must not be written into the manifest"
        assert e["valueFrom"]["secretKeyRef"] == {"name": "aperture", "key": key}


def test_secret_example_has_every_key_referenced(docs):
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for d in docs:
        if d["kind"] not in ("Deployment", "DaemonSet", "StatefulSet"):
            continue
        spec = pod(d)
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], (d["metadata"]["name"], ref)
        for v in spec.get("volumes", []):
            if "secret" in v:
                s = secrets[v["secret"]["secretName"]]
                for item in v["secret"].get("items", []):
                    assert item["key"] in s["stringData"]


def test_aggregator_runs_non_root_read_only(aggregator):
    spec = pod(aggregator)
    c = container(aggregator, "aggregator")
    sc = c["securityContext"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"


def test_aggregator_data_dir_is_a_writable_volume(aggregator):
    c = container(aggregator, "aggregator")
    data_dir = env_of(c)["APERTURE_DATA_DIR"]["value"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert data_dir in mounts and not mounts[data_dir].get("readOnly", False)
    vol = next(v for v in pod(aggregator)["volumes"] if v["name"] == mounts[data_dir]["name"])
    assert "emptyDir" in vol or "persistentVolumeClaim" in vol


def test_aggregator_resources_fit_the_buffer(aggregator):
    c = container(aggregator, "aggregator")
    res = c["resources"]
    for kind in ("requests", "limits"):
        assert "cpu" in res[kind] and "memory" in res[kind]
    mib = {"Mi": 1, "Gi": 1024}
    limit = int(res["limits"]["memory"][:-2]) * mib[res["limits"]["memory"][-2:]]
    buffer = env_of(c)["APERTURE_BUFFER_CAPACITY"]["value"]
    m = re.fullmatch(r"(\d+)(MiB|GiB)", buffer)
    assert m, buffer
    buffer_mib = int(m.group(1)) * (1024 if m.group(2) == "GiB" else 1)
    assert limit >= 2 * buffer_mib, "the memory limit must leave room beyond the ingest buffer"


# --- agent ------------------------------------------------------------------

def test_agent_daemonset_label_and_selector(agent):
    assert agent["spec"]["selector"]["matchLabels"] == {"app": "aperture-agent"}
    assert agent["spec"]["template"]["metadata"]["labels"]["app"] == "aperture-agent"


def test_agent_host_pid(agent):
    assert pod(agent)["hostPID"] is True
    assert not pod(agent).get("hostNetwork", False), "the agent must resolve the cluster DNS name"


def test_agent_finds_the_aggregator_by_dns(agent):
    env = env_of(container(agent, "agent"))
    assert env["APERTURE_AGGREGATOR"]["value"] == f"{DNS_NAME}:50051"


def test_dns_name_matches_service_and_namespace(docs):
    svc = find("Service", "aperture-aggregator", docs)
    name = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    assert name == DNS_NAME


def test_agent_env(agent):
    env = env_of(container(agent, "agent"))
    for name in ("APERTURE_AGGREGATOR", "APERTURE_AUTH_TOKEN", "APERTURE_MODE", "APERTURE_FREQ", "NODE_NAME"):
        assert name in env, name
    assert env["APERTURE_MODE"]["value"] in ("cpu", "lock", "syscall", "all")
    assert 1 <= int(env["APERTURE_FREQ"]["value"]) <= 10000


def test_node_name_from_downward_api(agent):
    env = env_of(container(agent, "agent"))
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_env_var_names_are_ones_aperture_reads(aggregator, agent):
    known = documented_env_vars()
    for workload, cname in ((aggregator, "aggregator"), (agent, "agent")):
        unknown = set(env_of(container(workload, cname))) - known
        assert not unknown, f"{cname} sets variables Aperture does not read: {sorted(unknown)}"


def host_mounts(agent):
    c = container(agent, "agent")
    vols = {v["name"]: v for v in pod(agent)["volumes"]}
    out = {}
    for m in c["volumeMounts"]:
        v = vols[m["name"]]
        if "hostPath" in v:
            out[v["hostPath"]["path"]] = m
    return out


def test_agent_mounts_debugfs_tracefs_proc_cgroup(agent):
    mounts = host_mounts(agent)
    assert mounts["/sys/kernel/debug"]["mountPath"] == "/sys/kernel/debug"
    assert mounts["/sys/kernel/tracing"]["mountPath"] == "/sys/kernel/tracing"
    assert mounts["/proc"]["mountPath"] == "/host/proc"
    assert mounts["/sys/fs/cgroup"]["mountPath"] == "/sys/fs/cgroup"
    for path in ("/proc", "/sys/fs/cgroup", "/sys/kernel/debug", "/sys/kernel/tracing"):
        assert mounts[path].get("readOnly") is True, f"{path} must be mounted read-only"


def test_agent_data_dir_is_writable(agent):
    c = container(agent, "agent")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert not mounts["/var/lib/aperture"].get("readOnly", False)


def test_agent_tolerates_every_taint(agent):
    assert {"operator": "Exists"} in pod(agent)["tolerations"]


def test_agent_least_privilege(agent):
    spec = pod(agent)
    sc = container(agent, "agent")["securityContext"]
    assert sc.get("privileged", False) is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = set(sc["capabilities"]["add"])
    assert {"BPF", "PERFMON"} <= added
    assert added <= {"BPF", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE", "SYSLOG"}
    assert "SYS_ADMIN" not in added
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"


def test_every_added_capability_is_explained():
    text = (K8S / "agent-daemonset.yml").read_text(encoding="utf-8")
    block = text[text.index("add:"):text.index("volumeMounts:", text.index("add:"))]
    lines = block.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*- ([A-Z_]+)\s*$", line)
        if m:
            assert lines[i - 1].strip().startswith("#"), f"capability {m.group(1)} has no comment saying why"
            assert m.group(1) in "\n".join(lines[max(0, i - 6):i]), f"the comment above {m.group(1)} does not name it"


def test_nothing_is_privileged(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            for c in pod(d)["containers"] + pod(d).get("initContainers", []):
                assert c.get("securityContext", {}).get("privileged", False) is False, d["metadata"]["name"]
                assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_agent_rbac_is_pods_get_list_watch(docs):
    role = find("ClusterRole", "aperture-agent", docs)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = find("ClusterRoleBinding", "aperture-agent", docs)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "aperture-agent"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "aperture-agent", "namespace": "aperture"}]
    agent = find("DaemonSet", "aperture-agent", docs)
    assert pod(agent)["serviceAccountName"] == "aperture-agent"
    find("ServiceAccount", "aperture-agent", docs)
    # The pod watcher reads the projected token.
    assert pod(agent).get("automountServiceAccountToken", True) is True


def test_agent_probes_and_metrics_port(agent):
    c = container(agent, "agent")
    assert [(p["containerPort"], p.get("protocol", "TCP")) for p in c["ports"]] == [(9091, "TCP")]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["port"] in ("metrics", 9091)


def test_resources_everywhere(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            for c in pod(d)["containers"]:
                assert "requests" in c["resources"] and "limits" in c["resources"], d["metadata"]["name"]
                assert "memory" in c["resources"]["limits"], d["metadata"]["name"]


# --- ClickHouse ---------------------------------------------------------------

def test_clickhouse_statefulset(docs):
    sts = find("StatefulSet", "clickhouse", docs)
    svc = find("Service", "clickhouse", docs)
    assert svc["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == "clickhouse"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    c = container(sts, "clickhouse")
    assert c["image"].startswith("clickhouse/clickhouse-server:")
    assert {"name": "data", "mountPath": "/var/lib/clickhouse"} in c["volumeMounts"]
    assert 8123 in [p["port"] for p in svc["spec"]["ports"]]


def clickhouse_users_init(sts):
    hits = [c for c in pod(sts)["initContainers"] if c["name"] == "users"]
    assert len(hits) == 1, "the ClickHouse StatefulSet writes its user in an init container `users`"
    return hits[0]


def test_clickhouse_user_matches_the_aggregator(docs):
    """The init container creates the user the aggregator logs in as, with
    the password from the same Secret key."""
    sts = find("StatefulSet", "clickhouse", docs)
    agg = find("Deployment", "aperture-aggregator", docs)
    init = clickhouse_users_init(sts)
    ag = env_of(container(agg, "aggregator"))
    assert env_of(init)["CLICKHOUSE_USER"]["value"] == ag["APERTURE_CLICKHOUSE_USER"]["value"]
    vols = {v["name"]: v for v in pod(sts)["volumes"]}
    mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    secret_mount = mounts["/run/secrets/clickhouse"]
    secret = vols[secret_mount["name"]]["secret"]
    ref = ag["APERTURE_CLICKHOUSE_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret["secretName"] == ref["name"]
    assert {"key": ref["key"], "path": "password"} in secret["items"]


def test_clickhouse_password_is_a_file_not_an_environment_variable(docs):
    sts = find("StatefulSet", "clickhouse", docs)
    for c in pod(sts)["containers"] + pod(sts)["initContainers"]:
        for e in c.get("env", []):
            assert "secretKeyRef" not in e.get("valueFrom", {}), f"{c['name']}: {e['name']} comes from a Secret"
    # Readable by the pod's group (fsGroup), which is the non-root uid's.
    vols = {v["name"]: v for v in pod(sts)["volumes"]}
    secret_vols = [v["secret"] for v in vols.values() if "secret" in v]
    assert secret_vols and all(s["defaultMode"] == 0o440 for s in secret_vols)
    assert pod(sts)["securityContext"]["fsGroup"] == pod(sts)["securityContext"]["runAsGroup"]


def run_users_init(tmp_path, docs, password):
    """The init container's script, run here with its two paths moved into
    tmp_path; returns the process and the file it writes."""
    init = clickhouse_users_init(find("StatefulSet", "clickhouse", docs))
    assert init["command"] == ["/bin/sh", "-c"]
    script = init["args"][0]
    secret = tmp_path / "secret" / "password"
    users_d = tmp_path / "users.d"
    secret.parent.mkdir()
    users_d.mkdir()
    secret.write_bytes(password)
    assert "/run/secrets/clickhouse/password" in script and "/etc/clickhouse-server/users.d/" in script
    script = script.replace("/run/secrets/clickhouse/password", str(secret))
    script = script.replace("/etc/clickhouse-server/users.d/", str(users_d) + "/")
    env = {"PATH": "/usr/bin:/bin", "CLICKHOUSE_USER": env_of(init)["CLICKHOUSE_USER"]["value"]}
    r = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    return r, users_d / "aperture.xml"


def test_clickhouse_users_init_writes_the_user(tmp_path, docs):
    import hashlib
    import xml.etree.ElementTree as ET

    password = b"pa55-word<&>"
    r, out = run_users_init(tmp_path, docs, password)
    assert r.returncode == 0, r.stderr
    root = ET.parse(out).getroot()
    assert root.tag == "clickhouse"
    users = root.find("users")
    assert users.find("default").get("remove") == "remove", "the `default` user must be removed"
    ag = env_of(container(find("Deployment", "aperture-aggregator", docs), "aggregator"))
    user = users.find(ag["APERTURE_CLICKHOUSE_USER"]["value"])
    assert user is not None, ET.tostring(root)
    assert user.findtext("password_sha256_hex") == hashlib.sha256(password).hexdigest()
    assert user.find("password") is None, "the plain password must not be written"
    assert password.decode() not in out.read_text(encoding="utf-8")


def test_clickhouse_users_init_refuses_an_empty_password(tmp_path, docs):
    r, out = run_users_init(tmp_path, docs, b"")
    assert r.returncode != 0
    assert "clickhouse-password" in r.stderr
    assert not out.exists()


def test_clickhouse_root_filesystem_is_read_only(docs):
    sts = find("StatefulSet", "clickhouse", docs)
    spec = pod(sts)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] >= 10000
    vols = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], c["name"]
        assert "cpu" in c["resources"]["limits"] and "memory" in c["resources"]["limits"], c["name"]
    # What ClickHouse writes is on volumes: data, logs, /tmp.
    mounts = {m["mountPath"]: m for m in container(sts, "clickhouse")["volumeMounts"]}
    for path in ("/var/lib/clickhouse", "/var/log/clickhouse-server", "/tmp"):
        assert path in mounts and not mounts[path].get("readOnly", False), path
    users = mounts["/etc/clickhouse-server/users.d"]
    assert users["readOnly"] is True and "emptyDir" in vols[users["name"]]


# --- TLS between agent and aggregator ---------------------------------------

def configmap_yaml(docs, name, key):
    return yaml.safe_load(find("ConfigMap", name, docs)["data"][key])


def test_tls_settings_agree(docs):
    agg = configmap_yaml(docs, "aperture-aggregator", "aggregator.yml")
    agent = configmap_yaml(docs, "aperture-agent", "agent.yml")
    # A generated certificate would live in an emptyDir and change on restart.
    assert agg["tls"]["cert_file"] and agg["tls"]["key_file"]
    assert agent["transport"]["ca_file"]
    assert bool(agg["tls"].get("grpc", False)) == bool(agent["transport"].get("grpc_tls", False))
    assert not agent["transport"].get("insecure_skip_verify", False)


def test_config_paths_are_mounted(docs):
    """Every file a config names is inside a volume mounted in the container."""
    pairs = [("aperture-aggregator", "aggregator.yml", find("Deployment", "aperture-aggregator", docs), "aggregator",
              lambda c: [c["tls"]["cert_file"], c["tls"]["key_file"]]),
             ("aperture-agent", "agent.yml", find("DaemonSet", "aperture-agent", docs), "agent",
              lambda c: [c["transport"]["ca_file"], c["data_dir"]])]
    for cm, key, workload, cname, paths in pairs:
        cfg = configmap_yaml(docs, cm, key)
        c = container(workload, cname)
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        for p in paths(cfg):
            assert any(p == m or p.startswith(m.rstrip("/") + "/") for m in mounts), f"{p} is not mounted in {cname}"
        # And the config file itself, where the args say.
        args = c["args"]
        assert args[args.index("--config") + 1] in mounts


def test_config_keys_not_duplicated_by_env(docs):
    """What the environment sets is not also in the ConfigMap (env would win silently)."""
    env_keys = {"APERTURE_AUTH_TOKEN": ("auth", "token"), "APERTURE_CLICKHOUSE_ENDPOINT": ("clickhouse", "endpoint"),
                "APERTURE_CLICKHOUSE_DATABASE": ("clickhouse", "database"),
                "APERTURE_CLICKHOUSE_USER": ("clickhouse", "user"),
                "APERTURE_CLICKHOUSE_PASSWORD": ("clickhouse", "password"),
                "APERTURE_BUFFER_CAPACITY": ("buffer", "capacity"), "APERTURE_DATA_DIR": ("data_dir",)}
    agg = configmap_yaml(docs, "aperture-aggregator", "aggregator.yml")
    for path in env_keys.values():
        node = agg
        for k in path[:-1]:
            node = node.get(k, {})
        assert path[-1] not in node, f"{'.'.join(path)} is set by env and file"
    agent = configmap_yaml(docs, "aperture-agent", "agent.yml")
    for key in ("aggregator", "auth_token", "mode", "frequency_hz", "node_name"):
        assert key not in agent, f"{key} is set by env and file"


# --- kustomization ----------------------------------------------------------

def test_kustomization_applies_every_manifest():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert set(k) <= {"apiVersion", "kind", "resources", "images"}
    # Namespace first (it is also kustomize's order); the user's secret.yml
    # stands for secret.example.yml.
    assert k["resources"][0] == "namespace.yml"
    assert sorted(k["resources"]) == sorted(MANIFESTS + ["secret.yml"])
    for r in k["resources"]:
        assert r == "secret.yml" or (K8S / r).is_file(), r
    on_disk = {p.name for p in K8S.glob("*.yml")} | {p.name for p in K8S.glob("*.yaml")}
    assert on_disk - {"kustomization.yaml", "secret.example.yml", "secret.yml"} == set(MANIFESTS)


def test_secret_yml_is_ignored_by_git():
    assert "/secret.yml" in (K8S / ".gitignore").read_text(encoding="utf-8").split()


def test_images_match_the_kustomization_and_version(docs):
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    version = re.search(r'^\[workspace\.package\][^\[]*?^version\s*=\s*"([^"]+)"',
                        (ROOT / "Cargo.toml").read_text(encoding="utf-8"), re.M | re.S).group(1)
    images = {i["name"]: i for i in k["images"]}
    for kind, name, cname, image in (("Deployment", "aperture-aggregator", "aggregator", "aperture-aggregator"),
                                     ("DaemonSet", "aperture-agent", "agent", "aperture-agent")):
        c = container(find(kind, name, docs), cname)
        assert c["image"] == f"{image}:{version}"
        assert images[image]["newTag"] == version
