#!/usr/bin/env bash
# npdiffusion on a CUDA GPU, in one call of at most 10 minutes: install what is missing, check the
# GPU, run the toy trainer on CuPy, the whole test suite on the CuPy backend, the GPU benchmarks
# (tools/bench_gpu.py), and `npdiffusion demo` when this build has it; then print a summary table,
# last. Docs: docs/gpu.md.
#
#   bash tools/gpu_check.sh                      # everything, from the repository root or anywhere
#   NPD_STAGES="smoke tests" bash tools/gpu_check.sh
#   bash tools/gpu_check.sh --fetch-wheels [DIR] # on a machine WITH network: download the pinned
#                                                # test packages as wheels into DIR (default .whl)
#
# Installing. Each requirement of setup.cfg (install_requires and the "test" extra, plus
# open_clip_torch==3.3.0 and ftfy, which .ci/run adds) is checked by import and version; only what
# is missing or of another version is installed: from wheels in $NPD_WHEELS (default .whl in the
# repository root; made by --fetch-wheels, for GPU machines without network) into a private
# folder put first on PYTHONPATH, else with pip from the package index when it answers
# (NPD_OFFLINE=1 skips that). CuPy is installed
# (cupy-cuda12x) only when `import cupy` fails; torch only when it is missing (a CPU or CUDA torch
# that is there is kept). The project itself is pure Python and runs from this checkout
# (PYTHONPATH), so nothing of the machine's Python is modified unless pip must fetch a package.
#
# Stages and their time limits (seconds; override with the variables):
#   install  NPD_INSTALL_TIMEOUT=60   the above
#   smoke    NPD_SMOKE_TIMEOUT=40     GPU name, CUDA/CuPy/torch versions; one conv2d on CuPy vs NumPy
#   toy      NPD_TOY_TIMEOUT=40       `npdiffusion --backend cupy toy --steps 100` (CLI end to end)
#   tests    NPD_TESTS_TIMEOUT=270    NPDIFFUSION_BACKEND=cupy pytest tests -n auto -k "not [numpy"
#                                     (the numpy half of the backend fixture is deselected: CI runs
#                                     it; NPD_BOTH_BACKENDS=1 keeps it), --maxfail=$NPD_MAXFAIL (100;
#                                     1 = stop at the first failure, like -x), Hypothesis "ci"
#                                     profile, --timeout 120 per test when pytest-timeout is there,
#                                     SIGINT at the stage limit so pytest still reports what ran;
#                                     NPD_TESTS=paths runs a part (a rerun of failing files, say),
#                                     NPD_TEST_BACKEND=numpy tries the stage on a machine without GPU
#   bench    NPD_BENCH_TIMEOUT=150    python tools/bench_gpu.py (NPD_BENCH_ARGS adds arguments)
#   demo     NPD_DEMO_TIMEOUT=60      `npdiffusion --backend cupy demo`, only if the command exists
# Defaults add up to 560 s. Logs and results go to $OUT when it is set (the device tool's output
# folder), else to gpu_check_logs/ under the current folder: main.log, tests.log, junit.xml,
# bench.log, bench.json, toy.log, demo.log, summary.txt (eight files).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

# ------------------------------------------------------------------------------ --fetch-wheels
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    DIR="${2:-$REPO/.whl}"
    PYVER="${NPD_WHEEL_PY:-3.12}"
    mkdir -p "$DIR"
    # Pure-Python packages the GPU image lacks or has in another version (docs/gpu.md), plus regex
    # (transformers needs regex >= 2025.10.22) and wcwidth (ftfy's one dependency).
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DIR" diffusers==0.42.1 transformers==5.23.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth \
        "regex>=2025.10.22" || exit 1
    if [[ "$DIR" == "$REPO"/* ]] && ! git -C "$REPO" check-ignore -q "$DIR" 2>/dev/null; then
        echo "/${DIR#"$REPO"/}/" >> "$REPO/.git/info/exclude"
    fi
    du -sh "$DIR"
    if [[ "$DIR" == "$REPO"/* ]]; then
        echo "wheels in $DIR (git-ignored); carry it to the GPU machine (the device tool: carry [\"${DIR#"$REPO"/}\"])"
    else
        echo "wheels in $DIR; copy them into a git-ignored folder of the repository (.whl) and carry that"
    fi
    exit 0
fi

LOG="${OUT:-$PWD/gpu_check_logs}"
mkdir -p "$LOG"
STAGES_FILE="$(mktemp)"
SITE="${NPD_SITE:-/tmp/npd-site}"
WHEELS="${NPD_WHEELS:-$REPO/.whl}"
STAGES="${NPD_STAGES:-install smoke toy tests bench demo}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1
exec > >(tee -a "$LOG/main.log") 2>&1
TEE_PID=$!
cd "$REPO" || exit 1
echo "gpu_check: $(date -u +%FT%TZ) in $REPO, logs in $LOG, stages: $STAGES"

want() { [[ " $STAGES " == *" $1 "* ]]; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STAGES_FILE"; }
now() { date +%s; }
# run_stage NAME TIMEOUT LOGFILE CMD...: run CMD with a time limit (SIGINT, then KILL 20 s later),
# its output into LOGFILE and its last lines onto the screen; sets STATUS (ok / failed (rc N) /
# timed out) and SECS.
run_stage() {
    local name="$1" limit="$2" logfile="$3"; shift 3
    echo; echo "=== $name (limit ${limit}s): $*"
    local t0; t0=$(now)
    timeout -s INT -k 20 "$limit" "$@" > "$logfile" 2>&1
    local rc=$?
    SECS=$(( $(now) - t0 ))
    tail -n "${NPD_TAIL:-12}" "$logfile"
    if [[ $rc -eq 0 ]]; then STATUS=ok; elif [[ $rc -eq 124 || $rc -eq 137 ]]; then STATUS="timed out"
    else STATUS="failed (rc $rc)"; fi
}

# ------------------------------------------------------------------------------ install
if want install; then
    echo; echo "=== install (limit ${NPD_INSTALL_TIMEOUT:-60}s)"
    t0=$(now)
    # Prints one line per unmet requirement: "<pip spec> <no-deps 0|1> <installed version or ->".
    check_reqs() {
        PYTHONPATH="$SITE:$PYTHONPATH" "$PY" - "$REPO/setup.cfg" <<'EOF'
import configparser, re, sys
from importlib import metadata
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
lines = cfg["options"]["install_requires"].split("\n") + cfg["options.extras_require"]["test"].split("\n")
specs = [s.strip() for s in lines if s.strip()] + ["open_clip_torch==3.3.0", "ftfy"]
def version_ok(spec, have):
    try:
        from packaging.requirements import Requirement
        return have in Requirement(spec).specifier
    except Exception:
        m = re.search(r"==\s*([\w.]+)", spec)
        return m is None or m.group(1) == have
for spec in specs:
    name = re.split(r"[<>=!~ ]", spec, 1)[0]
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have is None or not version_ok(spec, have):
        print(spec, 1 if name == "open_clip_torch" else 0, have or "-")
try:
    import cupy  # noqa: F401
except Exception:
    print("cupy-cuda12x", 0, "-")
EOF
    }
    installed=""
    # 1. wheels carried in $WHEELS: each one whose exact version is not installed goes to $SITE.
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        todo=()
        for w in "$WHEELS"/*.whl; do
            IFS=- read -r wname wver _ <<< "$(basename "$w")"
            have="$(PYTHONPATH="$SITE:$PYTHONPATH" "$PY" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print("-")' "$wname")"
            [[ "$have" == "$wver" ]] || todo+=("$w")
        done
        if [[ ${#todo[@]} -gt 0 ]]; then
            timeout "${NPD_INSTALL_TIMEOUT:-60}" "$PY" -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --upgrade --target "$SITE" "${todo[@]}" \
                && installed+=" $(for w in "${todo[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
        fi
    fi
    # 2. what is still unmet, from the package index (needs network).
    missing="$(check_reqs)"
    online=0
    if [[ -n "$missing" && "${NPD_OFFLINE:-0}" != 1 ]]; then
        timeout 20 "$PY" -m pip index versions pip --retries 0 --timeout 5 > /dev/null 2>&1 && online=1
        [[ $online == 1 ]] || echo "no package index reachable: nothing can be fetched (carry wheels: --fetch-wheels)"
    fi
    if [[ -n "$missing" && $online == 1 ]]; then
        echo "missing or of another version (wanted, installed):"
        echo "$missing" | awk '{print "  " $1 " (have " $3 ")"}'
        while read -r spec nodeps have; do
            [[ -z "$spec" ]] && continue
            extra=(); [[ "$nodeps" == 1 ]] && extra=(--no-deps)
            timeout "${NPD_INSTALL_TIMEOUT:-60}" "$PY" -m pip install -q --retries 1 --timeout 15 \
                "${extra[@]}" "$spec" && installed+=" $spec"
        done <<< "$missing"
    fi
    [[ -d "$SITE" ]] && export PYTHONPATH="$SITE:$PYTHONPATH"
    still="$(check_reqs | awk '{print $1}' | tr '\n' ' ')"
    DETAIL="${installed:+installed:$installed; }"
    if [[ -n "$still" ]]; then
        STATUS=incomplete; DETAIL+="still missing: $still(no network? run --fetch-wheels elsewhere and carry .whl)"
    else
        STATUS=ok; DETAIL="${DETAIL:-nothing to install}"
    fi
    echo "$DETAIL"
    record install "$STATUS" "$(( $(now) - t0 ))" "$DETAIL"
fi

# ------------------------------------------------------------------------------ smoke
if want smoke; then
    run_stage smoke "${NPD_SMOKE_TIMEOUT:-40}" "$LOG/smoke.tmp" "$PY" - <<'EOF'
import platform, subprocess
import numpy as np
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as exc:
    smi = f"nvidia-smi failed: {exc}"
print("nvidia-smi:", smi)
import torch
print("python", platform.python_version(), "| numpy", np.__version__, "| torch", torch.__version__,
      "cuda", torch.version.cuda, "available", torch.cuda.is_available())
import cupy
print("cupy", cupy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "| device", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
from npdiffusion.backend import asarray, set_backend, to_numpy
from npdiffusion.ops.conv import conv2d_forward
rng = np.random.default_rng(0)
x, w = rng.standard_normal((2, 3, 9, 9)), rng.standard_normal((4, 3, 3, 3))
set_backend("cupy")
y = to_numpy(conv2d_forward(asarray(x), asarray(w), padding=1)[0])
set_backend("numpy")
y0 = conv2d_forward(x, w, padding=1)[0]
rel = float(np.abs(y - y0).max() / np.abs(y0).max())
print(f"SMOKE: {smi.split(',')[0] or 'GPU'}, cupy {cupy.__version__}; conv2d float64 CuPy vs NumPy rel err {rel:.1e}")
assert rel < 1e-12, rel
EOF
    DETAIL="$(grep '^SMOKE: ' "$LOG/smoke.tmp" | cut -c8-)"
    rm -f "$LOG/smoke.tmp"
    record smoke "$STATUS" "$SECS" "${DETAIL:-see main.log}"
fi

# ------------------------------------------------------------------------------ toy (CLI)
if want toy; then
    run_stage toy "${NPD_TOY_TIMEOUT:-40}" "$LOG/toy.log" "$PY" -m npdiffusion --backend cupy toy --steps 100 \
        --batch-size 64
    DETAIL="$(grep '^toy: ' "$LOG/toy.log" | tail -1 | cut -c6-)"
    record toy "$STATUS" "$SECS" "${DETAIL:-$(tail -1 "$LOG/toy.log" | cut -c1-160)}"
fi

# ------------------------------------------------------------------------------ tests
if want tests; then
    # shellcheck disable=SC2206  # NPD_TESTS is a list of paths on purpose
    args=(-m pytest ${NPD_TESTS:-tests} -q -rfE --tb=short -p no:cacheprovider --junitxml="$LOG/junit.xml"
          --maxfail="${NPD_MAXFAIL:-100}")
    "$PY" -c "import xdist" 2>/dev/null && args+=(-n "${NPD_WORKERS:-auto}")
    "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 120)
    "$PY" -c "import pytest_benchmark" 2>/dev/null && args+=(-p no:benchmark)   # no test uses it; it warns under xdist
    [[ "${NPD_BOTH_BACKENDS:-0}" == 1 ]] || args+=(-k "not [numpy")
    # one BLAS/OpenMP thread per xdist worker: the workers already fill the cores
    run_stage tests "${NPD_TESTS_TIMEOUT:-270}" "$LOG/tests.log" env NPDIFFUSION_BACKEND="${NPD_TEST_BACKEND:-cupy}" \
        HYPOTHESIS_PROFILE=ci \
        OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$PY" "${args[@]}"
    record tests "$STATUS" "$SECS" "junit"
fi

# ------------------------------------------------------------------------------ bench
if want bench; then
    # shellcheck disable=SC2086  # NPD_BENCH_ARGS is a list of words on purpose
    run_stage bench "${NPD_BENCH_TIMEOUT:-150}" "$LOG/bench.log" "$PY" tools/bench_gpu.py --json "$LOG/bench.json" \
        ${NPD_BENCH_ARGS:-}
    record bench "$STATUS" "$SECS" "json"
fi

# ------------------------------------------------------------------------------ demo
if want demo; then
    if "$PY" -m npdiffusion --help 2>/dev/null | grep -qE '^ +demo '; then
        demo_dir="$(mktemp -d)"
        ( cd "$demo_dir" && run_stage demo "${NPD_DEMO_TIMEOUT:-60}" "$LOG/demo.log" "$PY" -m npdiffusion \
            --backend cupy demo; record demo "$STATUS" "$SECS" "$(tail -1 "$LOG/demo.log")" )
    else
        record demo skipped 0 "this build has no 'demo' command yet"
    fi
fi

# ------------------------------------------------------------------------------ summary (last)
"$PY" - "$STAGES_FILE" "$LOG" <<'EOF' | tee "$LOG/summary.txt"
import json, os, sys
import xml.etree.ElementTree as ET
stages_file, log = sys.argv[1], sys.argv[2]
rows = [line.rstrip("\n").split("\t") for line in open(stages_file) if line.strip()]
failing = []
for r in rows:
    if r[0] == "tests":
        path = os.path.join(log, "junit.xml")
        try:
            root = ET.parse(path).getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
            n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
            r[3] = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
            for case in root.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failing.append(f"{case.get('classname', '')}::{case.get('name', '')}")
        except (OSError, ET.ParseError):
            r[3] = "no junit.xml (see tests.log)"
    elif r[0] == "bench":
        try:
            data = json.load(open(os.path.join(log, "bench.json")))
            r[3] = "; ".join(f"{b['name']} x{b['ratio']:.2f} ({b['ours_tflops']:.1f} vs {b['torch_tflops']:.1f} TF/s)"
                             for b in data["rows"])
        except (OSError, ValueError, KeyError):
            r[3] = "no bench.json (see bench.log)"
if failing:
    print(f"\nfailing tests ({len(failing)}; first 25):")
    for f in failing[:25]:
        print("  " + f)
print("\n=== gpu_check summary (bench: ours / torch time ratio, achieved TFLOP/s) ===")
print(f"{'stage':<8} {'status':<16} {'s':>5}  detail")
for name, status, secs, detail in rows:
    print(f"{name:<8} {status:<16} {secs:>5}  {detail}")
bad = [r for r in rows if r[1] not in ("ok", "skipped")]
print("RESULT:", "all stages ok" if not bad else "problems in " + ", ".join(r[0] for r in bad))
sys.exit(1 if bad else 0)
EOF
rc=${PIPESTATUS[0]}
rm -f "$STAGES_FILE"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit "$rc"
