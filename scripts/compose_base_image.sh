#!/usr/bin/env bash
# A base image for deploy/Dockerfile made from Debian packages (mmdebstrap + docker import), for hosts that cannot
# pull python:3.11-slim. Debian bookworm's python3 is 3.11, as in the default base. This host's extra CA
# certificates (/usr/local/share/ca-certificates) go in too, so pip inside the build trusts what the host trusts.
#   scripts/compose_base_image.sh [TAG]          # default TAG splitmesh-base:bookworm; prints the tag
# The root filesystem is cached (SPLITMESH_DOCKER_CACHE, default ~/.cache/splitmesh/docker), so a rerun only imports.
set -euo pipefail
tag=${1:-splitmesh-base:bookworm}
cache=${SPLITMESH_DOCKER_CACHE:-$HOME/.cache/splitmesh/docker}
mirror=${SPLITMESH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs=$cache/debian-bookworm-python3.tar
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
mkdir -p "$cache"
if [ ! -s "$rootfs" ]; then
  command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing: apt-get install -y mmdebstrap" >&2; exit 1; }
  hooks=()
  shopt -s nullglob
  extra=(/usr/local/share/ca-certificates/*.crt)
  if [ ${#extra[@]} -gt 0 ]; then
    hooks+=(--customize-hook="copy-in ${extra[*]} /usr/local/share/ca-certificates"
            --customize-hook='chroot "$1" update-ca-certificates')
  fi
  mmdebstrap --variant=minbase --format=tar --include=python3,python3-venv,ca-certificates --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' "${hooks[@]}" bookworm "$rootfs.tmp" "$mirror" >&2
  mv "$rootfs.tmp" "$rootfs"
fi
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' "$rootfs" "$tag" >/dev/null
echo "$tag"
