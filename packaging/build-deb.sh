#!/usr/bin/env bash
# Build llm-appliance_<version>-1_<arch>.deb with dpkg-deb (no debhelper needed).
#
# The package holds a self-contained Python virtual environment in /opt/llm-appliance (the app and
# every Python dependency, torch included), the systemd unit, /etc/llm-appliance/appliance.toml,
# the logrotate rules and /usr/bin/llm-appliance. postinst creates the system user
# llm-appliance; nothing is enabled or started: `systemctl enable --now llm-appliance` is the
# operator's call.
#
# Usage: packaging/build-deb.sh [OUTDIR]                    (default OUTDIR: dist/)
# Environment:
#   PYTHON      the interpreter the venv is built on; it must be the TARGET's (the venv links to
#               it), default /usr/bin/python3. The .deb depends on its pythonX.Y package.
#   TORCH_SPEC  which torch to bundle, default torch==2.13.0 (the CPU build on the dev machines);
#               on a GPU build host give its CUDA build, e.g. torch==2.11.0.
#   PIP_ARGS    extra pip arguments, e.g. "--no-index --find-links /srv/wheels" offline.
#   COMPRESS    dpkg-deb compressor arguments, default "-Zgzip -z1" (torch is large; xz is slow).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=$(mkdir -p "${1:-$REPO/dist}" && cd "${1:-$REPO/dist}" && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PIP_ARGS=${PIP_ARGS:-}
COMPRESS=${COMPRESS:--Zgzip -z1}
PREFIX=/opt/llm-appliance
NAME=llm-appliance

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -1)
ARCH=$(dpkg --print-architecture)
PYVER=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/llm-appliance-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
ROOT=$STAGE/root
echo "building $NAME $VERSION for $ARCH on python$PYVER in $STAGE"

# ---- the venv, built in the staging tree, then made to live at $PREFIX
"$PYTHON" -m venv "$ROOT$PREFIX"
VPIP=("$ROOT$PREFIX/bin/python" -m pip --disable-pip-version-check -q)
# shellcheck disable=SC2086 # PIP_ARGS is a list of words
"${VPIP[@]}" install --no-compile $PIP_ARGS "$TORCH_SPEC"
# shellcheck disable=SC2086
"${VPIP[@]}" install --no-compile $PIP_ARGS "$TORCH_SPEC" "$REPO"
# NOTE: a venv is not relocatable: its scripts' #! lines and pyvenv.cfg name the staging path.
grep -rlI --null "$ROOT$PREFIX" "$ROOT$PREFIX/bin" "$ROOT$PREFIX/pyvenv.cfg" | xargs -0 -r sed -i "s#$ROOT$PREFIX#$PREFIX#g"
# Byte-compile now (the unit keeps /opt read-only), recording the installed paths, not ours.
"$ROOT$PREFIX/bin/python" -m compileall -q -j0 -s "$ROOT" -p / "$ROOT$PREFIX/lib" >/dev/null || true

# ---- files around it
install -D -m 0644 "$REPO/systemd/$NAME.service" "$ROOT/lib/systemd/system/$NAME.service"
install -D -m 0644 "$REPO/etc/appliance.toml" "$ROOT/etc/$NAME/appliance.toml"
install -D -m 0644 "$REPO/logrotate/$NAME" "$ROOT/etc/logrotate.d/$NAME"
mkdir -p "$ROOT/usr/bin"
ln -s "$PREFIX/bin/llm-appliance" "$ROOT/usr/bin/llm-appliance"
DOC=$ROOT/usr/share/doc/$NAME
install -D -m 0644 "$REPO/README.md" "$DOC/README.md"
printf 'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: %s\n\nFiles: *\nCopyright: llm-appliance authors\nLicense: Apache-2.0\n' "$NAME" > "$DOC/copyright"
printf '%s (%s-1) unstable; urgency=medium\n\n  * Package build.\n\n -- llm-appliance maintainers <root@localhost>  %s\n' \
  "$NAME" "$VERSION" "$(date -R)" | gzip -9n > "$DOC/changelog.Debian.gz"

# ---- control files
mkdir -p "$ROOT/DEBIAN"
cat > "$ROOT/DEBIAN/control" <<EOF
Package: $NAME
Version: $VERSION-1
Architecture: $ARCH
Maintainer: llm-appliance maintainers <root@localhost>
Depends: python$PYVER, adduser, systemd
Recommends: logrotate
Section: net
Priority: optional
Installed-Size: $(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
Description: self-hosted LLM serving appliance (OpenAI-compatible API)
 A daemon that serves a local language model over an OpenAI-compatible HTTP API,
 with its own paged-KV continuous-batching engine, run by systemd (Type=notify,
 watchdog), a control socket, and a terminal dashboard.
EOF
printf '/etc/%s/appliance.toml\n/etc/logrotate.d/%s\n' "$NAME" "$NAME" > "$ROOT/DEBIAN/conffiles"
install -m 0755 "$REPO/packaging/debian/postinst" "$REPO/packaging/debian/prerm" "$REPO/packaging/debian/postrm" "$ROOT/DEBIAN/"

DEB=$OUTDIR/${NAME}_${VERSION}-1_${ARCH}.deb
# shellcheck disable=SC2086
dpkg-deb --root-owner-group $COMPRESS --build "$ROOT" "$DEB" >/dev/null
echo "$DEB"
