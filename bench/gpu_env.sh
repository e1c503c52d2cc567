# Sourced by the GPU scripts (gpu_check.sh, gpu_configs.sh, gpu_decode.sh) from the repository root:
# installs the Python packages the GPU machine lacks from wheel files in .whl/ (see bench/README.md),
# never from a network, and puts the repository on PYTHONPATH.
missing=$(python3 -c '
import importlib.util as u
mods = ["optuna", "sqlalchemy", "alembic", "pydantic", "torchao", "yaml", "typer", "rich", "psutil"]
print(" ".join(m for m in mods if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "missing Python packages ($missing) and no wheels in .whl/" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/autotune-site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/autotune-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
