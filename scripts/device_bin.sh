#!/bin/bash
# Device machine only: unpack the carried
# Axolotl site (.axsite/site.tar.xz, from scripts/build_device_site.sh) and put
# `axolotl`, `accelerate` and `torchrun` next to the interpreter, as an install would.
set -e
tar -xJf .axsite/site.tar.xz -C /tmp
BIN=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
for pair in "axolotl:axolotl.cli.main" "accelerate:accelerate.commands.accelerate_cli" "torchrun:torch.distributed.run"; do
  name=${pair%%:*}; module=${pair#*:}
  [ -x "$BIN/$name" ] && [ "$name" = torchrun ] && continue
  printf '#!/bin/sh\nexec %s -m %s "$@"\n' "$BIN/python3" "$module" > "$BIN/$name"
  chmod +x "$BIN/$name"
done
