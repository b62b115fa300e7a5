#!/usr/bin/env bash
# Fetches the newest Debian cloud kernel (linux-image-*-cloud-amd64) for the
# Linux boot tests: DEST/bzImage as shipped, and DEST/vmlinux, the same kernel
# uncompressed (a PVH ELF). Nothing here is committed; DEST defaults to
# .test-assets/linux. Idempotent: does nothing when both files exist.
set -euo pipefail
dest=${1:-.test-assets/linux}
if [ -s "$dest/vmlinux" ] && [ -s "$dest/bzImage" ]; then exit 0; fi
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

newest() {
  apt-cache search --names-only '^linux-image-[0-9].*-cloud-amd64$' | awk '{print $1}' | sort -V | tail -n 1
}
pkg=$(newest)
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(newest)
fi
[ -n "$pkg" ] || { echo "fetch-test-kernel: no linux-image-*-cloud-amd64 in the package index" >&2; exit 1; }
command -v lz4 >/dev/null && command -v zstd >/dev/null || apt-get install -y -qq lz4 zstd >/dev/null

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "$pkg" >/dev/null 2>&1) || {
  apt-get update -qq
  (cd "$work" && apt-get download "$pkg" >/dev/null)
}
dpkg-deb -x "$work"/*.deb "$work/x"
cp "$work"/x/boot/vmlinuz-* "$work/bzImage"

# The payload: setup_sects at 0x1f1, payload_offset/length at 0x248/0x24c.
python3 - "$work/bzImage" "$work/payload" <<'PY'
import struct, sys
img = open(sys.argv[1], 'rb').read()
setup_sects = img[0x1f1] or 4
off, length = struct.unpack_from('<II', img, 0x248)
start = (setup_sects + 1) * 512 + off
open(sys.argv[2], 'wb').write(img[start:start + length])
PY
magic=$(od -An -tx1 -N4 "$work/payload" | tr -d ' ')
case "$magic" in
  # the kernel appends its decompressed size after the stream, which the
  # tools report as trailing garbage: the ELF check below judges the result
  02214c18) lz4 -dc "$work/payload" > "$work/vmlinux" 2>/dev/null || true ;;
  28b52ffd) zstd -dc "$work/payload" > "$work/vmlinux" 2>/dev/null || true ;;
  fd377a58) xz -dc "$work/payload" > "$work/vmlinux" 2>/dev/null || true ;;
  1f8b*) gzip -dc "$work/payload" > "$work/vmlinux" 2>/dev/null || true ;;
  *) echo "fetch-test-kernel: unknown payload compression (magic $magic) in $pkg" >&2; exit 1 ;;
esac
if ! readelf -n "$work/vmlinux" 2>/dev/null | grep -q 'Xen'; then
  echo "fetch-test-kernel: $pkg's vmlinux has no Xen PVH note" >&2
  exit 1
fi
mv "$work/bzImage" "$work/vmlinux" "$dest/"
echo "$pkg" > "$dest/package"
echo "fetch-test-kernel: $pkg -> $dest"
