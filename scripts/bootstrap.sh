# Sourced by the other scripts: create .venv on first use and install the project into it.
# Usage: source scripts/bootstrap.sh [EXTRA]   (EXTRA: a pyproject extra such as "test")

set -euo pipefail

repository_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repository_root"

python_command="${PYTHON:-python3}"
if ! "$python_command" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: $python_command is missing or older than Python 3.11; install 3.11+ or set PYTHON=/path/to/python3.11" >&2
    exit 2
fi

if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv with $("$python_command" --version)" >&2
    "$python_command" -m venv .venv
fi

# Reinstall only when pyproject.toml changed since the last install, to keep reruns fast.
extra="${1:-}"
target="."
[ -n "$extra" ] && target=".[$extra]"
stamp=".venv/.installed-${extra:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "Installing the project into .venv (${target}); the first time takes about a minute" >&2
    # sentence-transformers needs torch; ask for the CPU build by its exact version first,
    # because an open version range makes pip choose a CUDA build of several gigabytes.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --editable "$target"
    touch "$stamp"
fi
