#!/usr/bin/env bash
# Steps of the learned-eviction training that run ON the GPU machine (tools/train/README.md).
# Run from the repository root of the device copy; everything that must outlive one call goes to
# /tmp/train (the repository copy is re-synced on every call).
#
#   tools/train/device.sh setup            install .cache/train/wheels/*.whl into /tmp/train/site
#   tools/train/device.sh part MODEL NN    keep .cache/train/parts/MODEL/pNN as /tmp/train/MODEL/pNN
#   tools/train/device.sh assemble MODEL SHA256   join the pieces into /tmp/train/MODEL.gguf, check it
#   tools/train/device.sh versions         python, torch, transformers, gguf, GPU
set -euo pipefail
T=/tmp/train
mkdir -p "$T"
case "${1:-}" in
setup)
    if [ ! -f "$T/site/.done" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$T/site" .cache/train/wheels/*.whl
        touch "$T/site/.done"
    fi ;;
part)
    mkdir -p "$T/$2"
    cp ".cache/train/parts/$2/p$3" "$T/$2/p$3.tmp" && mv "$T/$2/p$3.tmp" "$T/$2/p$3"
    echo "$2 part $3: $(stat -c %s "$T/$2/p$3") bytes; have $(ls "$T/$2" | grep -c '^p[0-9]*$')" ;;
assemble)
    if [ -f "$T/$2.gguf" ] && [ "$(cat "$T/$2.sha256" 2>/dev/null)" = "$3" ]; then echo "$2 already assembled"; exit 0; fi
    cat "$T/$2"/p[0-9][0-9] > "$T/$2.gguf"
    got=$(sha256sum "$T/$2.gguf" | cut -d' ' -f1)
    echo "$2.gguf $(stat -c %s "$T/$2.gguf") bytes sha256 $got"
    [ "$got" = "$3" ] || { echo "SHA256 MISMATCH (want $3)"; exit 3; }
    echo "$got" > "$T/$2.sha256"; rm -f "$T/$2"/p[0-9][0-9] ;;
versions)
    PYTHONPATH=$T/site python3 -c '
import sys, torch, transformers, gguf, numpy
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "gguf", getattr(gguf, "__version__", "?"), "numpy", numpy.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' ;;
*) echo "usage: $0 setup | part MODEL NN | assemble MODEL SHA256 | versions"; exit 2 ;;
esac
