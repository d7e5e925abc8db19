# Sourced by runs/runcpu.sh and runs/speedrun.sh: make .venv (CPU torch, this package and its dev extras) in the
# repository root if needed, and set PY to its python. PYTHON: the interpreter that makes the venv.
cpu_venv() {
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        "$python" -m venv .venv
    fi
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -e ".[dev]"
    PY=.venv/bin/python
}
