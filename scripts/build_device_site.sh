#!/bin/bash
# Build .axsite/site.tar.xz: what `axolotl train` + GOLD + DeepSpeed imports and the device
# machine lacks (Python 3.12, torch/transformers/peft/accelerate already there), as one
# Python site (about 22 MB compressed, under the device's 64 MiB carry limit).
# mistral_common (imported by transformers when it checks a processor's tokenizer class)
# needs jsonschema and tiktoken, which the device lacks. The list came from recording sys.modules in real `axolotl train` runs (1 process, and
# 2 processes under ZeRO-3). Binaries no run touches are dropped: bitsandbytes' libraries
# other than CUDA 13's, wandb's Go service, mistral_common's tokenizer data, pycountry's
# locales, torchao's compiled kernels (built for another torch).
# The axolotl-contribs packages have no wheels on the index: copied from .venv (setup.sh).
# Then, on the device machine: bash scripts/device_bin.sh; PYTHONPATH=/tmp/axsite:$PWD ...
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=$(mktemp -d) SITE=$(mktemp -d)/axsite
PKGS=(
  axolotl==0.19.0 accelerate==1.13.0 peft==0.20.0 transformers==5.16.1 trl==1.9.0
  datasets==4.8.4 dill==0.4.0 multiprocess==0.70.18 hjson
  pydantic==2.12.5 pydantic-core==2.41.5 pydantic-extra-types annotated-types==0.8.0
  typing-inspection==0.4.5 addict backoff bitsandbytes==0.50.2 brotli chardet defusedxml
  distro evaluate==0.4.1 fastcore fire h2 hpack hyperframe kernels==0.16.2
  kernels-data==0.16.2 liger-kernel==0.8.1 mistral-common==1.11.5 more-itertools
  posthog==6.7.11 pycountry sniffio termcolor torchao==0.17.0 wandb==0.31.0
  zstandard==0.22.0 platformdirs python-dotenv==1.0.1 pytz
  jsonschema jsonschema-specifications referencing rpds-py attrs tiktoken regex
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2 googleapis-common-protos==1.76.0
)
PLATFORM=(--python-version 3.12 --implementation cp --only-binary=:all:
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for p in "${PKGS[@]}"; do
  python3 -m pip download -q --no-deps "${PLATFORM[@]}" -d "$WHEELS" "$p"
done
# DeepSpeed is a source distribution: a pure-Python wheel (ops built just in time), as setup.sh
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.18.9
python3 -m pip install -q --no-deps --no-compile --target "$SITE" "${PLATFORM[@]}" "$WHEELS"/*.whl
SP=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for info in "$SP"/axolotl_contribs_*.dist-info; do
  (cd "$SP" && cut -d, -f1 "$info/RECORD" | grep -v -e '^\.\./' -e __pycache__ |
    while read -r f; do mkdir -p "$SITE/$(dirname "$f")"; cp "$f" "$SITE/$f"; done)
done
find "$SITE/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' -delete
rm -rf "$SITE/wandb/bin" "$SITE/mistral_common/data" "$SITE/pycountry/locales"
rm -f "$SITE"/torchao/_C*.so
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .axsite
tar -C "$(dirname "$SITE")" -cJf .axsite/site.tar.xz axsite
ls -la .axsite/site.tar.xz
