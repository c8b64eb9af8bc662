#!/usr/bin/env bash
# Stage Debian's Slurm + munge as .deb files for the offline GPU box (run HERE, on a Debian 12 host
# with network, from the repository root); scripts/gpu/local_slurm.sh unpacks them there.
#
#   bash scripts/gpu/stage_slurm_debs.sh      # -> .slurm/debs/*.deb (git-ignored), ~9 MB
#
# What travels: slurmctld, slurmd, slurm-client, slurm-wlm-basic-plugins, munge + libmunge2, and
# every shared library they link that a minimal Ubuntu image may lack. On the box only the
# libraries its own system is missing are used (local_slurm.sh asks ldd), so nothing shadows a
# newer system library. Everything here needs glibc >= 2.34 (printed at the end).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
command -v apt-get >/dev/null || { echo "needs apt-get (a Debian 12 / bookworm host)" >&2; exit 1; }
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || echo "warning: staging from $PRETTY_NAME, not Debian 12" >&2
PACKAGES=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge libmunge2
          libhwloc15 libnuma1 liblz4-1 libpam0g libaudit1 libcap-ng0 libreadline8 libtinfo6
          libjson-c5 liblua5.1-0 libyaml-0-2 libdbus-1-3 libsystemd0 libcap2 libgcrypt20
          libgpg-error0 liblzma5 libzstd1 libbz2-1.0 zlib1g libudev1)
rm -rf .slurm/debs && mkdir -p .slurm/debs
(cd .slurm/debs && apt-get download -q "${PACKAGES[@]}" 2>&1 | grep -v "unsandboxed" || true)
n=$(ls .slurm/debs/*.deb | wc -l)
[ "$n" = "${#PACKAGES[@]}" ] || { echo "expected ${#PACKAGES[@]} .deb files, got $n" >&2; exit 1; }
# the newest glibc symbol version any binary or library needs
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for deb in .slurm/debs/*.deb; do dpkg -x "$deb" "$tmp"; done
need=$(find "$tmp" -type f \( -name '*.so*' -o -perm -u+x \) -exec objdump -T {} + 2>/dev/null \
       | grep -o 'GLIBC_[0-9.]*' | sort -t. -k2 -n -u | tail -1 || true)
echo "staged $n packages in .slurm/debs: $(du -sh .slurm/debs | cut -f1); newest glibc symbol needed: $need"
