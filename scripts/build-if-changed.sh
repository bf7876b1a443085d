#!/usr/bin/env bash
# Build and install the extension only when something it is compiled from changed.
#
#   scripts/build-if-changed.sh            (the Makefile's `build` target; PYTHON and PIP from the env)
#
# The key is a SHA-256 over: every file under csrc/ (path and content), setup.py, CMakeLists.txt,
# the Python interpreter (sys.executable), torch.__version__ and torch.version.cuda, and the build
# switches (FORCE_CUDA, DFMU_FORCE_CPU, TORCH_CUDA_ARCH_LIST, CUDA_HOME). It is kept in
# build/.dfmu-build-stamp after a successful install. The install runs when the stamp is missing
# (a fresh machine, after `make clean`) or different, or when the compiled library or the
# installed package is absent or points elsewhere; otherwise this prints one line and exits. FORCE_REBUILD=1 always builds.
# After a build, `python -m dfmu_ext.buildcheck` must pass (errors raised in C++ reach Python whole);
# the stamp is written only then. (PYTHON, PIP and BUILDCHECK may be overridden, as the tests do.)
set -euo pipefail
PYTHON=${PYTHON:-python3}
PIP=${PIP:-"$PYTHON -m pip"}
BUILDCHECK=${BUILDCHECK:-"$PYTHON -m dfmu_ext.buildcheck"}
STAMP=${STAMP:-build/.dfmu-build-stamp}

key() {
    {
        if [ -d csrc ]; then
            find csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
        fi
        for f in setup.py CMakeLists.txt; do
            if [ -f "$f" ]; then sha256sum "$f"; else echo "absent $f"; fi
        done
        "$PYTHON" -c 'import sys, torch; print(sys.executable, torch.__version__, torch.version.cuda)'
        echo "FORCE_CUDA=${FORCE_CUDA:-} DFMU_FORCE_CPU=${DFMU_FORCE_CPU:-}"
        echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} CUDA_HOME=${CUDA_HOME:-}"
    } | sha256sum | cut -d' ' -f1
}

# Installed = the library is built here and `import dfmu_ext` from another folder finds this
# checkout (an editable install made from a clone that has since moved or been deleted leaves its
# metadata behind, pointing nowhere). find_spec locates the package without importing torch.
installed() {
    local here
    here=$(pwd -P)
    ls dfmu_ext/_C*.so >/dev/null 2>&1 && [ -f dfmu_ext/_build_config.py ] &&
        (cd / && "$PYTHON" -c 'import importlib.util as u, os, sys
s = u.find_spec("dfmu_ext")
sys.exit(not (s and s.origin and os.path.realpath(s.origin) == os.path.join(sys.argv[1], "dfmu_ext", "__init__.py")))' "$here") \
        >/dev/null 2>&1
}

want=$(key)
if [ "${FORCE_REBUILD:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && installed; then
    echo "dfmu_ext is up to date (sources, torch and build switches unchanged since $STAMP); not rebuilding"
    exit 0
fi
rm -f "$STAMP"
# --no-build-isolation: compile against the installed torch (see setup.py's docstring).
$PIP install --quiet --no-build-isolation --no-deps -e .
# A build whose C++ errors cannot reach Python (a static libstdc++, see dfmu_ext/buildcheck.py) is
# refused here, with the reason, rather than found later as a crash; no stamp, so it builds again.
if ! $BUILDCHECK; then
    echo "the build is unusable: C++ argument errors do not reach Python intact (see the problems above)" >&2
    exit 1
fi
mkdir -p "$(dirname "$STAMP")"
echo "$want" > "$STAMP"
