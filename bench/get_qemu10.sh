#!/bin/sh
# Unpack QEMU 10.0.2 (Debian bookworm-backports) into DIR beside the system's QEMU, for `make bench`.
#
#   bench/get_qemu10.sh DIR        -> DIR/usr/bin/qemu-storage-daemon, qemu-img, qemu-io
#
# QEMU 10.0.2 is the newest QEMU a Debian 12 user can install, so the comparison's QEMU columns use it.
# Nothing is installed system-wide: apt reads a private sources list and keeps its lists and downloads
# under DIR/apt; `dpkg -x` unpacks the two packages holding the programs, which run against bookworm's
# libraries. Exits 0 with a warning when it cannot (no network, not Debian 12): the bench then uses the
# QEMU on PATH and says which one in its header.
set -u
DIR=${1:?usage: $0 DIR}
QEMU_VERSION=10.0.2
if [ -x "$DIR/usr/bin/qemu-storage-daemon" ] && "$DIR/usr/bin/qemu-storage-daemon" --version | grep -q " $QEMU_VERSION "; then
    exit 0
fi
warn() { echo "bench/get_qemu10.sh: $*; the comparison uses the QEMU on PATH" >&2; exit 0; }
command -v apt-get >/dev/null && command -v dpkg >/dev/null || warn "apt-get/dpkg not found"
. /etc/os-release 2>/dev/null
[ "${VERSION_CODENAME:-}" = bookworm ] || warn "not Debian 12 (bookworm)"
APT="$DIR/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$DIR/debs" || warn "cannot create $DIR"
echo "deb http://deb.debian.org/debian bookworm-backports main" > "$APT/sources.list"
set -- -q -o Dir::Etc::SourceList="$APT/sources.list" -o Dir::Etc::SourceParts=/nonexistent \
    -o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache"
echo "fetching QEMU $QEMU_VERSION (bookworm-backports) into $DIR" >&2
apt-get "$@" update >"$APT/update.log" 2>&1 || warn "apt-get update failed (see $APT/update.log)"
rm -f "$DIR"/debs/*.deb
(cd "$DIR/debs" && apt-get "$@" download qemu-utils/bookworm-backports qemu-system-common/bookworm-backports) \
    >"$APT/download.log" 2>&1 || warn "apt-get download failed (see $APT/download.log)"
for deb in "$DIR"/debs/*.deb; do
    dpkg -x "$deb" "$DIR" || warn "dpkg -x $deb failed"
done
"$DIR/usr/bin/qemu-storage-daemon" --version | grep -q " $QEMU_VERSION " || warn "the unpacked qemu-storage-daemon is not $QEMU_VERSION"
echo "QEMU $QEMU_VERSION unpacked: $DIR/usr/bin" >&2
