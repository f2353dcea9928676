#!/usr/bin/env bash
# setup.sh — prepare a Debian machine for runphi and run one of:
#   bash setup.sh test [pytest args...]   install everything, run the whole test suite
#   bash setup.sh demo                    install everything, boot a demo ZIC on the simulator
#   bash setup.sh deps                    install everything, nothing else
# Needs root for the Debian packages (it uses sudo when not root). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"

# Installed with --no-install-recommends, so every package the suite needs is named here, none
# left to a Recommends (QEMU's ipxe-qemu NIC ROMs are one: the suite's QEMU runs say -nodefaults
# instead). Only what every Debian system has goes unnamed: dpkg, apt, coreutils, dash, bash.
# tests/test_clean_machine.py checks this list against the commands the code runs.
DEBIAN_PACKAGES=(
    containerd runc busybox-static          # real containerd end to end
    containernetworking-plugins             # CNI bridge + host-local (/usr/lib/cni): CRI pods with a pod network
    nftables                                # nft: runphi's NAT for a networked Jailhouse ZIC; the tests' leftover checks
    qemu-system-arm                         # QEMU guest engine
    gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu make   # our aarch64 test inmates
    gcc binutils libc6-dev                  # cell configs compiled by gcc as the reference (<stdint.h>)
    device-tree-compiler                    # dtc checks the device trees runphi patches
    procps                                  # ps, for `runphi ps`
    python3-venv python3-pip
)
# kubectl decodes the Kubernetes example manifests offline in the tests; any kubectl will do.
command -v kubectl >/dev/null 2>&1 || DEBIAN_PACKAGES+=(kubernetes-client)
VENV=${RUNPHI_VENV:-.venv}
PYTHON=${PYTHON:-python3}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else echo "setup: installing Debian packages needs root: run as root (or install sudo)" >&2; exit 1
    fi
}

install_debian_packages() {
    local missing=()
    for p in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "setup: installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

install_python_env() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "setup: $PYTHON is missing or older than 3.11; set PYTHON=/path/to/python3.11+" >&2
        exit 1
    fi
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
}

cmd=${1:-test}
shift || true
install_debian_packages
install_python_env
case "$cmd" in
    deps) ;;
    test)
        set +e
        "$VENV/bin/python" -m pytest "$@"
        rc=$?
        set -e
        if [ $rc -eq 5 ]; then echo "setup: pytest collected no tests: that is a failure" >&2; exit 1; fi
        exit $rc
        ;;
    demo) exec "$VENV/bin/python" -m tools.demo "$@" ;;
    *) echo "usage: bash setup.sh {test|demo|deps} [args...]" >&2; exit 2 ;;
esac
