#!/bin/sh
# target/install.sh — install runphi on a board (or any Linux machine with Python 3.11+).
#
# Usage (as root):   sh target/install.sh [SOURCE]
#   SOURCE   what to pip-install: the runphi source tree (default: the tree this
#            script belongs to) or a built wheel.
#
# What it does, and nothing else:
#   1. creates (or reuses) a Python venv at $RUNPHI_PREFIX and installs runphi into it
#      (the platform templates come with it, inside the runphi package);
#   2. links $RUNPHI_BINDIR/runphi and $RUNPHI_BINDIR/containerd-shim-runphi-v2 (runphi's
#      containerd shim, runtime io.containerd.runphi.v2) to the venv's;
#   3. writes $RUNPHI_CONFIG from target/runphi.toml if that file does not exist
#      yet (an existing configuration is never touched);
#   4. prints the containerd snippet to merge into /etc/containerd/config.toml.
# It does not install Jailhouse, containerd or runc, and does not restart anything.
#
# Environment (defaults in brackets):
#   RUNPHI_PREFIX   [/opt/runphi]               the venv
#   RUNPHI_BINDIR   [/usr/local/bin]            where the links go: a directory on containerd's
#                                               PATH (it finds shims there; BinaryName names runphi)
#   RUNPHI_CONFIG   [/etc/runphi/runphi.toml]   runphi's configuration file
#   PYTHON          [python3]                   interpreter for the venv (3.11 or newer)
#   PIP_*                                       passed through to pip (index, proxy, ...)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
tree=$(dirname "$here")
source_spec=${1:-$tree}
prefix=${RUNPHI_PREFIX:-/opt/runphi}
bindir=${RUNPHI_BINDIR:-/usr/local/bin}
config=${RUNPHI_CONFIG:-/etc/runphi/runphi.toml}
python=${PYTHON:-python3}

fail() { echo "install.sh: $*" >&2; exit 1; }

check_python() {
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
        fail "$python is missing or older than 3.11: install python3 (3.11+) or set PYTHON=/path/to/python3.11"
    "$python" -c 'import venv, ensurepip' 2>/dev/null ||
        fail "$python cannot create virtual environments: install the python3-venv package"
}

install_venv() {
    [ -x "$prefix/bin/python" ] || "$python" -m venv "$prefix" ||
        fail "cannot create the venv $prefix: check RUNPHI_PREFIX and free space"
    "$prefix/bin/python" -m pip install --quiet --disable-pip-version-check "$source_spec" ||
        fail "pip could not install runphi from $source_spec into $prefix (see pip's message above)"
}

link_binary() {
    mkdir -p "$bindir"
    ln -sf "$prefix/bin/runphi" "$bindir/runphi"
    ln -sf "$prefix/bin/containerd-shim-runphi-v2" "$bindir/containerd-shim-runphi-v2"
}

write_config() {
    if [ -e "$config" ]; then
        echo "install.sh: keeping the existing $config"
        return 0
    fi
    mkdir -p "$(dirname "$config")"
    staging="$config.new.$$"
    cp "$here/runphi.toml" "$staging"
    mv "$staging" "$config"
    echo "install.sh: wrote $config (backend = \"jailhouse\"; set [jailhouse] platform for this board)"
}

print_containerd_snippet() {
    echo
    echo "# Merge into /etc/containerd/config.toml, then restart containerd:"
    sed -e '/^#/d' -e '/^ *#/d' -e '/^$/d' \
        -e "s|^\( *BinaryName = \).*|\1\"$bindir/runphi\"|" "$here/containerd-runphi.toml"
}

check_runc() {
    command -v runc >/dev/null 2>&1 ||
        echo "install.sh: warning: no runc on PATH; plain containers (pause, sidecars) need it (set runc = in $config)" >&2
    return 0
}

check_python
install_venv
link_binary
write_config
check_runc
"$bindir/runphi" --version
print_containerd_snippet
