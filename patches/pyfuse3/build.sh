#!/bin/bash
# Install pyfuse3 into a venv from its sdist with nonblocking-session-loop.patch applied.
#
#   patches/pyfuse3/build.sh PYTHON CONSTRAINTS
#
# PYTHON is the venv's interpreter, CONSTRAINTS the constraints file that pins
# pyfuse3 (the version patched) and Cython (which compiles it). Does nothing
# when that version, patched, is installed already. If anything fails (no sdist,
# the patch does not apply, the build breaks), it says so and installs stock
# pyfuse3 of the same version instead: colofs works with either, the patched
# one is faster (see README.md here). Exit status is non-zero only if neither
# could be installed.
set -u -o pipefail

PY=${1:?usage: build.sh PYTHON CONSTRAINTS}
CONSTRAINTS=$(realpath "${2:?usage: build.sh PYTHON CONSTRAINTS}")
HERE=$(cd "$(dirname "$0")" && pwd)
PATCH=$HERE/nonblocking-session-loop.patch

VERSION=$(sed -n 's/^pyfuse3==\([^ ]*\)$/\1/Ip' "$CONSTRAINTS")
if [ -z "$VERSION" ]; then
    echo "build.sh: no pyfuse3== pin in $CONSTRAINTS" >&2
    exit 1
fi

if [ -n "${COLOFS_STOCK_PYFUSE3:-}" ]; then
    # Asked for: the fallback on purpose (to compare the two, or to rule the patch out).
    echo "pyfuse3: COLOFS_STOCK_PYFUSE3 is set; installing stock pyfuse3 $VERSION"
    "$PY" -m pip uninstall -q -y pyfuse3 >/dev/null 2>&1
    PIP_CONSTRAINT=$CONSTRAINTS "$PY" -m pip install -q -c "$CONSTRAINTS" \
        "pyfuse3==$VERSION"
    exit
fi
# Already there: the pinned version, patched.
if "$PY" - "$VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
import pyfuse3
sys.exit(0 if version("pyfuse3") == sys.argv[1] and getattr(pyfuse3, "NONBLOCKING_SESSION_LOOP", False) else 1)
EOF
then
    exit 0
fi

# Whichever pyfuse3 is installed goes first, so that pip installs the one chosen below.
"$PY" -m pip uninstall -q -y pyfuse3 >/dev/null 2>&1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/colofs-pyfuse3.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

stock() {
    echo "pyfuse3: building the patched pyfuse3 $VERSION failed ($1); installing stock pyfuse3 $VERSION" \
         "(works, but its session loop is slower: see patches/pyfuse3/README.md)" >&2
    PIP_CONSTRAINT=$CONSTRAINTS "$PY" -m pip install -q -c "$CONSTRAINTS" \
        "pyfuse3==$VERSION"
}

patched() {
    echo "pyfuse3: building pyfuse3 $VERSION with patches/pyfuse3/nonblocking-session-loop.patch"
    "$PY" -m pip download -q --no-binary :all: --no-deps "pyfuse3==$VERSION" -d "$WORK" >"$WORK/log" 2>&1 \
        || { tail -5 "$WORK/log" >&2; return 1; }
    tar -xzf "$WORK"/pyfuse3-"$VERSION".tar.gz -C "$WORK" || return 1
    patch -d "$WORK/pyfuse3-$VERSION" -p1 --forward --quiet <"$PATCH" || return 1
    # PIP_CONSTRAINT reaches the isolated build environment: Cython is the pinned one.
    PIP_CONSTRAINT=$CONSTRAINTS "$PY" -m pip install -q -c "$CONSTRAINTS" \
        "$WORK/pyfuse3-$VERSION" >"$WORK/log" 2>&1 || { tail -20 "$WORK/log" >&2; return 1; }
    "$PY" -c 'import pyfuse3, sys; sys.exit(0 if pyfuse3.NONBLOCKING_SESSION_LOOP else 1)' || return 1
}

patched || stock "see the lines above"
