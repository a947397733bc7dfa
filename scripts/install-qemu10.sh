#!/usr/bin/env bash
# Installs QEMU 10 from Debian's bookworm-backports (close to the QEMU Kata ships) beside the
# system's QEMU 7.2, never replacing it: the packages are downloaded with a private apt
# state (its own sources list, package lists and cache under ${SKIFF_CACHE:-/var/cache/skiff},
# the system's apt configuration untouched) and unpacked into
# ${SKIFF_CACHE}/tools/qemu10. Idempotent. Prints the path of the wrapper that runs it
# (qemu-system-x86_64 with its own libraries and firmware).
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
cache="${SKIFF_CACHE:-/var/cache/skiff}"
prefix="$cache/tools/qemu10"
wrapper="$prefix/qemu-system-x86_64"
if [[ -x "$wrapper" ]] && "$wrapper" --version >/dev/null 2>&1; then
    echo "$wrapper"
    exit 0
fi
apt_dir="$cache/apt-bookworm-backports"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat > "$apt_dir/sources.list" <<SOURCES
deb [signed-by=$keyring] http://deb.debian.org/debian bookworm-backports main
deb [signed-by=$keyring] http://deb.debian.org/debian bookworm main
deb [signed-by=$keyring] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=$keyring] http://deb.debian.org/debian-security bookworm-security main
SOURCES
apt_opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=/nonexistent"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "APT::Default-Release=bookworm-backports"
)
apt-get "${apt_opts[@]}" update >&2
# What installing QEMU 10 over this system would bring: QEMU's own packages and the
# backported libraries it needs. Downloaded and unpacked only, never installed.
mapfile -t pkgs < <(apt-get "${apt_opts[@]}" -s install --no-install-recommends \
    qemu-system-x86/bookworm-backports qemu-system-data/bookworm-backports \
    2>/dev/null | awk '/^Inst /{print $2}')
[[ ${#pkgs[@]} -gt 0 ]] || { echo "install-qemu10: nothing to download?" >&2; exit 1; }
echo "install-qemu10: unpacking ${pkgs[*]}" >&2
(cd "$apt_dir/debs" && rm -f ./*.deb && apt-get "${apt_opts[@]}" download "${pkgs[@]}" >&2)
rm -rf "$prefix.new"
mkdir -p "$prefix.new"
for deb in "$apt_dir"/debs/*.deb; do
    dpkg-deb -x "$deb" "$prefix.new/root"
done
[[ -x "$prefix.new/root/usr/bin/qemu-system-x86_64" ]] \
    || { echo "install-qemu10: no qemu-system-x86_64 in the packages" >&2; exit 1; }
# Its libraries first, then the system's; its firmware first (-L), then the system's
# (seabios, ipxe) for what the QEMU packages only link to.
cat > "$prefix.new/qemu-system-x86_64" <<WRAP
#!/bin/sh
root="$prefix/root"
export LD_LIBRARY_PATH="\$root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "\$root/usr/bin/qemu-system-x86_64" -L "\$root/usr/share/qemu" -L /usr/share/qemu -L /usr/share/seabios "\$@"
WRAP
chmod +x "$prefix.new/qemu-system-x86_64"
rm -rf "$prefix"
mv "$prefix.new" "$prefix"
"$wrapper" --version | head -n 1 >&2
echo "$wrapper"
