#!/usr/bin/env bash
# fetch_data.sh — evaluation text: Jane Austen's six novels -> data/austen/<novel>.txt (ignored folder).
#
# Source: the Debian package r-cran-janeaustenr (bookworm: 1.0.0-1). It is fetched with
# `apt-get download` (no installation, no root needed when the apt lists are present), unpacked with
# `dpkg-deb -x` into .cache/apt-data/, and its R lazy-load database (data/Rdata.rdb/.rdx) is decoded by
# tools/austen_extract.py (pure Python, no R). Each output file is the novel's lines joined by "\n".
# The six texts are checked against pinned sha256 sums (the .deb's own sum is only reported, so a
# rebuilt Debian package with identical text still passes). Idempotent; outputs are written atomically.
#
# Environment: PYTHON (default python3), KVS_DATA_DIR (default data), KVS_DATA_CACHE (default .cache/apt-data)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA_DIR=${KVS_DATA_DIR:-data}
CACHE=${KVS_DATA_CACHE:-.cache/apt-data}
PKG=r-cran-janeaustenr
DEB_SHA=df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95   # r-cran-janeaustenr_1.0.0-1_all.deb
OUT="$DATA_DIR/austen"

declare -A TXT_SHA=(
    [emma]=7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe
    [mansfieldpark]=98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9
    [northangerabbey]=51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed
    [persuasion]=8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a
    [prideprejudice]=dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d
    [sensesensibility]=105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09
)

log() { printf 'fetch_data: %s\n' "$*" >&2; }
die() { printf 'fetch_data: ERROR: %s\n' "$*" >&2; exit 1; }

all_ok() {
    local n
    for n in "${!TXT_SHA[@]}"; do
        [ -f "$OUT/$n.txt" ] || return 1
        [ "$(sha256sum "$OUT/$n.txt" | cut -d' ' -f1)" = "${TXT_SHA[$n]}" ] || return 1
    done
}

if all_ok; then log "$OUT: six novels present, sha256 ok"; exit 0; fi

mkdir -p "$CACHE"
RDATA=""
# 1. an installed copy of the package, if any
for d in /usr/lib/R/site-library/janeaustenr/data /usr/local/lib/R/site-library/janeaustenr/data; do
    if [ -f "$d/Rdata.rdb" ] && [ -f "$d/Rdata.rdx" ]; then RDATA=$d; log "using installed $d"; break; fi
done

# 2. otherwise the .deb, cached
if [ -z "$RDATA" ]; then
    deb=$(ls -1 "$CACHE"/${PKG}_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        command -v apt-get >/dev/null 2>&1 ||
            die "apt-get not found: this script needs a Debian/Ubuntu system (or copy ${PKG}_*.deb into $CACHE/)"
        # As root, apt fetches as its unprivileged user _apt, which cannot write into a cache
        # folder owned by root, and warns "Download is performed unsandboxed as root". The
        # download is one public .deb checked by sha256 below, so run it as root on purpose.
        APT_OPTS=(-q)
        [ "$(id -u)" = 0 ] && APT_OPTS+=(-o APT::Sandbox::User=root)
        log "apt-get download $PKG -> $CACHE/"
        if ! (cd "$CACHE" && apt-get "${APT_OPTS[@]}" download "$PKG" >&2); then
            if [ "$(id -u)" = 0 ]; then
                log "apt-get download failed; running apt-get update once and retrying"
                apt-get update -qq >&2 || true
                (cd "$CACHE" && apt-get "${APT_OPTS[@]}" download "$PKG" >&2) ||
                    die "apt-get download $PKG failed even after apt-get update (no Debian mirror reachable?)"
            else
                die "apt-get download $PKG failed; the apt lists may be missing: run 'sudo apt-get update' (or copy ${PKG}_*.deb into $CACHE/) and retry"
            fi
        fi
        deb=$(ls -1 "$CACHE"/${PKG}_*.deb 2>/dev/null | head -n1 || true)
        [ -n "$deb" ] || die "apt-get download reported success but no ${PKG}_*.deb is in $CACHE"
    fi
    got=$(sha256sum "$deb" | cut -d' ' -f1)
    if [ "$got" = "$DEB_SHA" ]; then log "$(basename "$deb"): sha256 ok"
    else log "note: $(basename "$deb") sha256 is $got (pinned $DEB_SHA); the extracted texts are still verified"; fi
    command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found"
    rm -rf "$CACHE/x"
    dpkg-deb -x "$deb" "$CACHE/x" || die "dpkg-deb -x $deb failed (corrupt download? delete it and retry)"
    RDATA="$CACHE/x/usr/lib/R/site-library/janeaustenr/data"
    [ -f "$RDATA/Rdata.rdb" ] || die "$deb has no $RDATA/Rdata.rdb"
fi

mkdir -p "$OUT"
tmpd=$(mktemp -d "$DATA_DIR/.austen.XXXXXX")
trap 'rm -rf "$tmpd"' EXIT
"$PYTHON" tools/austen_extract.py "$RDATA" "$tmpd" >&2 || die "tools/austen_extract.py failed"
for n in "${!TXT_SHA[@]}"; do
    got=$(sha256sum "$tmpd/$n.txt" | cut -d' ' -f1)
    [ "$got" = "${TXT_SHA[$n]}" ] || die "$n.txt: sha256 $got does not match the pinned ${TXT_SHA[$n]}"
done
for n in "${!TXT_SHA[@]}"; do mv -f "$tmpd/$n.txt" "$OUT/$n.txt"; done
log "$OUT: six novels written and verified"
