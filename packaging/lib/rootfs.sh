# shellcheck shell=bash
# A cached debootstrap base per Debian suite, shared by build-deb.sh (byte-compiling for a Python the
# host lacks) and test-install (the booted container). Source this file; then `rootfs_base SUITE`
# prints the base's path, building it once.
#
# Where: $LLM_APPLIANCE_ROOTFS_CACHE, default <repo>/.cache/debootstrap/<suite> (git-ignored), so CI
# reuses it between the steps of one run and a dev machine between runs. A base is complete when
# its .complete marker exists; a half-built one is rebuilt.
#
# The base is what an operator's minimal Debian box has plus the tools the test drives with
# (curl, procps): no python3-venv, no pip, no build tools. The packages must bring the rest.
ROOTFS_PACKAGES=systemd,systemd-sysv,dbus,python3,curl,adduser,logrotate,procps,ca-certificates,man-db

rootfs_mirror() {  # $1 suite: the mirror this host's apt uses (never hard-coded), else deb.debian.org
  local m
  m=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' 2>/dev/null |
      awk -v s="$1" '$2==s{print $1; exit}')
  [ -n "$m" ] || m=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' 2>/dev/null |
      awk '$1 ~ /\/debian\/?$/ {print $1; exit}')
  echo "${m:-http://deb.debian.org/debian/}"
}

rootfs_base() {  # $1 suite -> prints the base directory
  local suite=$1 repo cache base log
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  cache=${LLM_APPLIANCE_ROOTFS_CACHE:-$repo/.cache/debootstrap}
  base=$cache/$suite log=$cache/$suite.log
  if [ ! -e "$base/.complete" ]; then
    command -v debootstrap >/dev/null || { echo "debootstrap missing (apt-get install debootstrap)" >&2; return 1; }
    mkdir -p "$cache"; rm -rf "$base"
    echo "debootstrap $suite into $base (log: $log)" >&2
    debootstrap --variant=minbase --include="$ROOTFS_PACKAGES" "$suite" "$base" "$(rootfs_mirror "$suite")" \
      >"$log" 2>&1 || { tail -20 "$log" >&2; echo "debootstrap $suite failed" >&2; return 1; }
    # A dated snapshot mirror must not make apt inside reject "expired" Release files.
    printf 'Acquire::Check-Valid-Until "false";\n' > "$base/etc/apt/apt.conf.d/99llm-appliance-test"
    rm -f "$base"/var/cache/apt/archives/*.deb
    touch "$base/.complete"
  fi
  echo "$base"
}

suite_python() {  # $1 suite -> the suite's python3 X.Y
  case $1 in
    bookworm) echo 3.11;; trixie) echo 3.13;;
    *) echo "unknown suite $1 (bookworm or trixie)" >&2; return 1;;
  esac
}

suite_tag() {  # $1 suite -> the Debian version tag used in package versions (~deb12)
  case $1 in bookworm) echo deb12;; trixie) echo deb13;; *) return 1;; esac
}
