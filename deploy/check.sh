#!/usr/bin/env bash
# Checks of deploy/ (issue 8), run by CI and by hand from any directory:
#   - every manifest against the Kubernetes API schemas (kubernetes-validate,
#     schemas bundled in the package, strict, Kubernetes 1.25 / 1.30 / 1.37);
#   - contract tests: the deployment page's facts read back from the manifests;
#   - the ConfigMaps' configurations through Aperture's own loader
#     (`aperture check-config`), with the environment the manifests set;
#   - the container files: locked release build, the binary cargo produces,
#     real subcommands as entrypoints;
#   - checkov on the manifests (Kubernetes checks and secret scanner): any
#     failed check fails the script, and the skipped checks must be exactly
#     the documented exceptions (deploy/tests/test_checkov.py);
#   - the NetworkPolicies, evaluated connection by connection.
# Needs python3 with pip (PyPI reachable on first run), cargo, openssl, readelf.
#
# Environment:
#   APERTURE_BIN            use this binary instead of building target/debug/aperture
#   APERTURE_DEPLOY_PYDEPS  where the pinned Python packages go (default /tmp/aperture-deploy-pydeps)
set -euo pipefail
cd "$(dirname "$0")/.."

req=deploy/tests/requirements.txt
pydeps="${APERTURE_DEPLOY_PYDEPS:-/tmp/aperture-deploy-pydeps}"
stamp="$pydeps/.installed-$(sha256sum "$req" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "deploy/check.sh: installing python3-pip" >&2
      apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    else
      echo "deploy/check.sh: python3 -m pip is required" >&2
      exit 1
    fi
  fi
  # --target: a private directory, so neither a venv module (python3-venv on
  # Debian) nor permission to touch the system's packages (PEP 668) is needed.
  rm -rf "$pydeps"
  python3 -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore \
    --no-warn-script-location --no-warn-conflicts --target "$pydeps" -r "$req"
  touch "$stamp"
fi

if [ -z "${APERTURE_BIN:-}" ]; then
  APERTURE_BIN="$PWD/target/debug/aperture"
  # CI's workspace build has made it already; building only when it is missing
  # avoids a second, differently-featured build of the workspace.
  if [ ! -x "$APERTURE_BIN" ]; then
    cargo build --locked -p aperture --quiet
  fi
fi
export APERTURE_BIN

set +e
PYTHONPATH="$pydeps" PYTHONDONTWRITEBYTECODE=1 python3 -m pytest deploy/tests \
  -p no:cacheprovider -q -rfE --strict-markers
rc=$?
set -e
case $rc in
  0) ;;
  5) echo "deploy/check.sh: pytest collected no tests; that is a failure here" >&2; exit 1 ;;
  *) echo "deploy/check.sh: pytest exited with $rc" >&2; exit "$rc" ;;
esac
