#!/bin/sh
# Install trisocks the way a service runs it: a virtualenv of its own, a user, a state directory.
# contrib/Dockerfile runs this script for its image, and tests/test_service.py runs it too, so
# the image's install steps are the tested ones. docs/deploy.md says more.
#
#   contrib/install.sh [OPTIONS] SOURCE
#
# SOURCE is a trisocks wheel (.whl, from `make dist`), an sdist (.tar.gz) or a source tree. An
# sdist or a source tree is first built into a wheel with the compiled extension (as `make dist`
# does: an extension that does not compile fails the build), then the wheel is installed.
#
#   --wheel-only DIR   build the wheel of SOURCE into DIR and stop there (nothing is installed)
#   --prefix DIR       the virtualenv to install into (default /opt/trisocks); the command is
#                      DIR/bin/trisocks
#   --user NAME        the user the service runs as (default trisocks), made a system user
#                      without a login shell when it does not exist yet (needs root)
#   --state-dir DIR    the state directory (the database), owned by that user, mode 700
#                      (default /var/lib/trisocks)
#   --no-user          neither user nor state directory (systemd's DynamicUser= and
#                      StateDirectory= make both)
#   --find-links DIR   take trisocks' dependencies (and build requirements) from the wheels in
#                      DIR only: no package index, e.g. on a machine without network
#
# Environment: PYTHON, the interpreter for the virtualenv (default python3, 3.11 or newer).
set -eu

prefix=/opt/trisocks
user=trisocks
state_dir=/var/lib/trisocks
make_user=yes
wheel_only=
find_links=
python=${PYTHON:-python3}

say() { printf 'install.sh: %s\n' "$*"; }
fail() { printf 'install.sh: error: %s\n' "$*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --user) user=${2:?--user needs a name}; shift 2 ;;
        --state-dir) state_dir=${2:?--state-dir needs a directory}; shift 2 ;;
        --no-user) make_user=; shift ;;
        --wheel-only) wheel_only=${2:?--wheel-only needs a directory}; shift 2 ;;
        --find-links) find_links=${2:?--find-links needs a directory}; shift 2 ;;
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[ $# -eq 1 ] || fail "give one SOURCE: a wheel, an sdist or a source tree (see --help)"
source=$1
[ -e "$source" ] || fail "$source: no such file or directory"

# the same pip settings for every pip run below and for the build environment pip makes
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
if [ -n "$find_links" ]; then
    [ -d "$find_links" ] || fail "--find-links $find_links: not a directory"
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$find_links"
fi

# -- the wheel ------------------------------------------------------------------------------------
build_wheel() {  # build_wheel SOURCE OUTDIR: the wheel of an sdist or a source tree, compiled
    mkdir -p "$2"
    say "building the wheel of $1 (compiled extension required)"
    TRISOCKS_REQUIRE_COMPILED=1 "$python" -m pip wheel --quiet --no-deps --wheel-dir "$2" "$1"
}

if [ -n "$wheel_only" ]; then
    case $source in *.whl) fail "$source is a wheel already" ;; esac
    build_wheel "$source" "$wheel_only"
    say "built: $(ls "$wheel_only"/trisocks-*.whl)"
    exit 0
fi

tmp=""
trap '[ -z "$tmp" ] || rm -rf "$tmp"' EXIT
case $source in
    *.whl) wheel=$source ;;
    *)
        tmp=$(mktemp -d)
        build_wheel "$source" "$tmp"
        wheel=$(ls "$tmp"/trisocks-*.whl)
        ;;
esac

# -- the virtualenv -------------------------------------------------------------------------------
if [ ! -x "$prefix/bin/python" ]; then
    say "creating the virtualenv $prefix"
    "$python" -m venv "$prefix"
fi
say "installing $(basename "$wheel") into $prefix"
"$prefix/bin/python" -m pip install --quiet --upgrade "$wheel"
# a wheel from `make dist` is compiled: say so, and fail if it is not what runs
version=$(TRISOCKS_REQUIRE_COMPILED=1 "$prefix/bin/trisocks" version)
say "installed $prefix/bin/trisocks: $version"

# -- the user and the state directory ------------------------------------------------------------
if [ -z "$make_user" ]; then
    say "no user and no state directory (--no-user)"
    exit 0
fi
if id -u "$user" >/dev/null 2>&1; then
    say "user $user exists"
else
    [ "$(id -u)" -eq 0 ] || fail "creating the user $user needs root (or give --no-user)"
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    if command -v useradd >/dev/null 2>&1; then
        useradd --system --user-group --home-dir "$state_dir" --no-create-home \
            --shell "$nologin" --comment "trisocks server" "$user"
    else  # busybox (Alpine)
        addgroup -S "$user"
        adduser -S -D -H -G "$user" -h "$state_dir" -s "$nologin" -g "trisocks server" "$user"
    fi
    say "created the system user $user"
fi
mkdir -p "$state_dir"
if [ "$(id -u)" -eq 0 ]; then
    chown "$user:" "$state_dir"  # and the user's own group
fi
chmod 700 "$state_dir"
say "state directory $state_dir (owner $user, mode 700)"
