#!/usr/bin/env bash
# Push an mbquant app bundle to the demo app's storage on a connected device (adb from Android platform-tools).
#   examples/android/push_bundle.sh runs/demo-bundle [device-serial]
set -euo pipefail
bundle=${1:?usage: push_bundle.sh BUNDLE_DIR [SERIAL]}
serial=${2:+-s $2}
for f in model.pte labels.txt preprocess.json report.json; do
  [ -f "$bundle/$f" ] || { echo "error: $bundle/$f is missing; write the bundle with: mbquant bundle RUN_DIR --out $bundle" >&2; exit 2; }
done
dest=/sdcard/Android/data/org.mbquant.demo/files/bundle
adb $serial shell mkdir -p "$dest"
for f in model.pte labels.txt preprocess.json report.json README.md; do
  [ -f "$bundle/$f" ] && adb $serial push "$bundle/$f" "$dest/$f"
done
echo "pushed $bundle to $dest; open the app (or tap 'Check the bundle again')"
