#!/usr/bin/env bash
# Steps of the kvpress peer run that execute ON the GPU machine (see tools/kvpress_peer.md).
# Run from the repository root of the device copy.  Everything persistent goes to /tmp/peer,
# outside the repository copy (which is re-synced on every call).
#
#   tools/kvpress_peer_device.sh setup             install .cache/peer-wheels/*.whl into /tmp/peer/site
#   tools/kvpress_peer_device.sh part NN           keep .cache/peer-parts/pNN as /tmp/peer/parts/pNN
#   tools/kvpress_peer_device.sh assemble SHA256   concatenate the parts to /tmp/peer/model.gguf, check it
#   tools/kvpress_peer_device.sh versions          print python/torch/transformers/kvpress versions
set -euo pipefail
P=/tmp/peer
mkdir -p "$P/parts"
export PYTHONPATH=$P/site${PYTHONPATH:+:$PYTHONPATH}

case "${1:-}" in
setup)
    if [ ! -f "$P/site/.done" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$P/site" .cache/peer-wheels/*.whl
        touch "$P/site/.done"
    fi
    ;;
part)
    n=$2
    cp ".cache/peer-parts/p$n" "$P/parts/p$n.tmp" && mv "$P/parts/p$n.tmp" "$P/parts/p$n"
    echo "part $n: $(stat -c %s "$P/parts/p$n") bytes; have $(ls "$P/parts" | grep -c '^p[0-9]*$') parts"
    ;;
assemble)
    want=$2
    if [ -f "$P/model.gguf" ] && [ "$(cat "$P/model.sha256" 2>/dev/null)" = "$want" ]; then
        echo "model already assembled"; exit 0
    fi
    cat "$P"/parts/p[0-9][0-9] > "$P/model.gguf"
    got=$(sha256sum "$P/model.gguf" | cut -d' ' -f1)
    echo "model.gguf $(stat -c %s "$P/model.gguf") bytes sha256 $got"
    if [ "$got" != "$want" ]; then echo "SHA256 MISMATCH (want $want)"; exit 3; fi
    echo "$got" > "$P/model.sha256"
    rm -f "$P"/parts/p[0-9][0-9]
    ;;
versions)
    python3 - <<'EOF'
import sys, importlib
print("python", sys.version.split()[0])
for m in ("torch", "transformers", "tokenizers", "huggingface_hub", "accelerate", "gguf", "numpy", "datasets",
          "pyarrow", "kvpress"):
    try:
        mod = importlib.import_module(m)
        from importlib.metadata import version
        try:
            v = version(m)
        except Exception:
            v = getattr(mod, "__version__", "?")
        print(f"{m:16} {v:12} {getattr(mod, '__file__', '')}")
    except Exception as e:
        print(f"{m:16} IMPORT FAILED: {e!r}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
    ;;
*)
    echo "usage: $0 setup|part NN|assemble SHA256|versions"; exit 2
    ;;
esac
