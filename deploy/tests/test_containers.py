"""The container files, without a container engine: what they build is the
locked release build of package `aperture`, what they copy is the binary that
build produces, and their entrypoints are real subcommands."""

import json
import os
import posixpath
import re
import shlex
import subprocess

import pytest

from conftest import DOCKER, ROOT, all_docs, container, find, run_binary

IMAGES = {
    # Dockerfile: (subcommand, workload kind, workload name, container name)
    "Dockerfile.agent": ("agent", "DaemonSet", "aperture-agent", "agent"),
    "Dockerfile.aggregator": ("aggregator", "Deployment", "aperture-aggregator", "aggregator"),
}


def parse(path):
    """Instructions of a Dockerfile as (INSTRUCTION, argument text), with
    continuation lines joined and comments dropped; stages as dicts."""
    lines, buf = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        lines.append(buf)
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    stages = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append({"image": words[0], "name": name, "index": len(stages), "instr": []})
        else:
            assert stages, f"{path.name}: {instr} before FROM"
            stages[-1]["instr"].append((instr, rest))
    return stages


def exec_form(rest):
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def workdir(stage):
    wd = "/"
    for instr, rest in stage["instr"]:
        if instr == "WORKDIR":
            wd = posixpath.join(wd, rest)
    return posixpath.normpath(wd)


def run_commands(stage):
    out = []
    for instr, rest in stage["instr"]:
        if instr == "RUN":
            words = shlex.split(rest)
            words = [w for w in words if not w.startswith("--mount=")]
            out.append(words)
    return out


def copies(stage):
    out = []
    for instr, rest in stage["instr"]:
        if instr == "COPY":
            words = exec_form(rest) if rest.startswith("[") else shlex.split(rest)
            flags = {w.split("=", 1)[0]: (w.split("=", 1) + [""])[1] for w in words if w.startswith("--")}
            paths = [w for w in words if not w.startswith("--")]
            out.append((flags, paths[:-1], paths[-1]))
    return out


def release_binary_relpath():
    """Where `cargo build --release -p aperture` puts the binary, relative to
    the workspace root, as cargo itself reports it (target dir from cargo's
    configuration, binary name from the package's bin target)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR")}
    out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps", "--locked", "--offline"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps", "--locked"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    meta = json.loads(out.stdout)
    pkg = next(p for p in meta["packages"] if p["name"] == "aperture")
    bins = [t["name"] for t in pkg["targets"] if "bin" in t["kind"]]
    assert bins == ["aperture"], bins
    target = os.path.relpath(meta["target_directory"], meta["workspace_root"])
    return posixpath.join(target, "release", bins[0]), meta


@pytest.fixture(scope="module")
def cargo_release():
    return release_binary_relpath()


@pytest.fixture(scope="module", params=sorted(IMAGES))
def dockerfile(request):
    return request.param, parse(DOCKER / request.param)


def build_and_runtime(stages):
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    return stages[0], stages[-1]


def test_base_images(dockerfile):
    name, stages = dockerfile
    build, runtime = build_and_runtime(stages)
    m = re.fullmatch(r"rust:1\.95(?:\.\d+)?-([a-z]+)", build["image"])
    assert m, f"{name}: build stage must use the Rust 1.95 image, not {build['image']}"
    r = re.fullmatch(r"debian:([a-z]+)-slim", runtime["image"])
    assert r, f"{name}: runtime must be a slim Debian image, not {runtime['image']}"
    # Same Debian release: the binary links against the builder's glibc.
    assert m.group(1) == r.group(1)


def test_locked_release_build(dockerfile):
    name, stages = dockerfile
    build, _ = build_and_runtime(stages)
    builds = [w for w in run_commands(build) if w[:2] == ["cargo", "build"]]
    assert len(builds) == 1, f"{name}: expected one cargo build"
    words = builds[0]
    assert words == ["cargo", "build", "--release", "--locked", "-p", "aperture"], words
    for instr, rest in build["instr"]:
        if instr in ("ENV", "ARG"):
            assert "CARGO_TARGET_DIR" not in rest and "CARGO_BUILD_TARGET" not in rest, f"{name}: {instr} {rest}"


def test_build_stage_gets_the_whole_workspace(dockerfile, cargo_release):
    name, stages = dockerfile
    build, _ = build_and_runtime(stages)
    _, meta = cargo_release
    copied = copies(build)
    wholesale = any(srcs == ["."] and dest in (".", "./", workdir(build)) and "--from" not in flags
                    for flags, srcs, dest in copied)
    if not wholesale:
        members = {os.path.relpath(os.path.dirname(p["manifest_path"]), ROOT) for p in meta["packages"]}
        have = {s.rstrip("/") for _, srcs, _ in copied for s in srcs}
        assert {"Cargo.toml", "Cargo.lock"} <= have and members - {"."} <= have, f"{name}: workspace not copied"


def test_copies_the_binary_cargo_builds(dockerfile, cargo_release):
    name, stages = dockerfile
    build, runtime = build_and_runtime(stages)
    relpath, _ = cargo_release
    from_build = [(f, s, d) for f, s, d in copies(runtime) if f.get("--from") in (build["name"], str(build["index"]))]
    assert len(from_build) == 1, f"{name}: the runtime stage must copy exactly one thing from the build stage"
    _, srcs, dest = from_build[0]
    assert srcs == [posixpath.join(workdir(build), relpath)], (srcs, relpath)


def entrypoint(runtime):
    eps = [exec_form(rest) for instr, rest in runtime["instr"] if instr == "ENTRYPOINT"]
    cmds = [exec_form(rest) for instr, rest in runtime["instr"] if instr == "CMD"]
    assert len(eps) == 1, "one ENTRYPOINT in exec form"
    return eps[0], (cmds[-1] if cmds else [])


def test_entrypoint_is_the_copied_binary_and_a_real_subcommand(dockerfile):
    name, stages = dockerfile
    _, runtime = build_and_runtime(stages)
    ep, cmd = entrypoint(runtime)
    sub = IMAGES[name][0]
    dest = [d for f, s, d in copies(runtime) if "--from" in f][0]
    assert ep[0] == dest, f"{name}: ENTRYPOINT runs {ep[0]}, the binary is copied to {dest}"
    assert ep[1:] == [sub]
    r = run_binary([*ep[1:], *cmd, "--help"])
    assert r.returncode == 0, f"`aperture {' '.join(ep[1:] + cmd)} --help` failed: {r.stderr}"


def test_manifest_args_are_accepted(dockerfile):
    name, stages = dockerfile
    _, runtime = build_and_runtime(stages)
    ep, _ = entrypoint(runtime)
    sub, kind, wname, cname = IMAGES[name]
    c = container(find(kind, wname, all_docs()), cname)
    assert "command" not in c, "the manifests rely on the image's ENTRYPOINT"
    r = run_binary([*ep[1:], *c.get("args", []), "--help"])
    assert r.returncode == 0, f"`aperture {sub} {' '.join(c.get('args', []))}` is rejected: {r.stderr}"


def test_bad_flags_are_rejected():
    """Control for the two tests above: clap refuses what it does not know."""
    assert run_binary(["agent", "--no-such-flag", "--help"]).returncode == 2
    assert run_binary(["no-such-subcommand", "--help"]).returncode == 2


def test_exposed_ports_match_the_manifests(dockerfile):
    name, stages = dockerfile
    _, runtime = build_and_runtime(stages)
    exposed = set()
    for instr, rest in runtime["instr"]:
        if instr == "EXPOSE":
            for p in rest.split():
                port, _, proto = p.partition("/")
                exposed.add((int(port), (proto or "tcp").upper()))
    _, kind, wname, cname = IMAGES[name]
    c = container(find(kind, wname, all_docs()), cname)
    assert exposed == {(p["containerPort"], p.get("protocol", "TCP")) for p in c["ports"]}


def test_aggregator_image_user_matches_the_manifest():
    _, runtime = build_and_runtime(parse(DOCKER / "Dockerfile.aggregator"))
    users = [rest for instr, rest in runtime["instr"] if instr == "USER"]
    assert users, "the aggregator image must not run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot can only verify numbers)"
    c = container(find("Deployment", "aperture-aggregator", all_docs()), "aggregator")
    assert int(uid) == c["securityContext"]["runAsUser"]
    assert gid and int(gid) == c["securityContext"]["runAsGroup"]


def test_aggregator_image_has_curl_for_the_health_check():
    _, runtime = build_and_runtime(parse(DOCKER / "Dockerfile.aggregator"))
    installs = [w for words in run_commands(runtime) for w in words]
    assert "curl" in installs, "docs/deploy.md verifies with `kubectl exec ... curl`"


def test_dockerignore_keeps_host_builds_out():
    texts = set()
    for name in IMAGES:
        path = DOCKER / f"{name}.dockerignore"
        assert path.is_file(), f"{path.name} missing"
        texts.add(path.read_text(encoding="utf-8"))
    assert len(texts) == 1, "both images must build from the same context"
    patterns = [l.strip() for l in texts.pop().splitlines() if l.strip() and not l.startswith("#")]
    assert "**/target" in patterns or "target" in patterns
    for needed in ("Cargo.toml", "Cargo.lock", "src", "core", "probes", "agent", "aggregator", "transport"):
        assert needed not in patterns and f"/{needed}" not in patterns
    assert not any(p.startswith("!") for p in patterns)


def test_binary_needs_only_what_debian_slim_has():
    """The runtime image adds no libraries: the binary may only need glibc's
    and libgcc's, which every Debian slim image has."""
    readelf = subprocess.run(["readelf", "-d", run_binary_path()], capture_output=True, text=True)
    if readelf.returncode != 0:
        pytest.fail(f"readelf failed: {readelf.stderr}")
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf.stdout))
    assert needed, "no NEEDED entries found: is this a dynamic ELF binary?"
    allowed = {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1",
               "libutil.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}
    assert needed <= allowed, f"the runtime image lacks {sorted(needed - allowed)}"


def run_binary_path():
    from conftest import binary
    return binary()
