# shellcheck shell=bash
# Debian packages through a private apt list, never the system's apt sources: sourced by the
# scripts that fetch test tools (deploy/tests/fetch-kustomize.sh, server/tests/numa/fetch-kernels.sh).
# The sourcing script defines `log` and `die`. The Debian mirror is the one the system's apt sources
# name, or MEMPLACE_DEBIAN_MIRROR.

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# The Debian archive URL that the system's apt sources use (not the security archive).
debian_mirror() {
    if [ -n "${MEMPLACE_DEBIAN_MIRROR:-}" ]; then echo "${MEMPLACE_DEBIAN_MIRROR%/}"; return; fi
    local uri
    uri=$(
        {
            sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | tr ' ' '\n'
            cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
                sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p'
        } | grep -E '^https?://.*/debian/?$' | head -n1
    ) || true
    [ -n "$uri" ] || die "no Debian archive in /etc/apt sources; set MEMPLACE_DEBIAN_MIRROR to one"
    echo "${uri%/}"
}

# apt_root DIR SUITES...: prepares the private apt directory DIR for SUITES (main, Packages only,
# signed by Debian's archive keyring) and sets APT to the apt-get/apt-cache options that use it.
apt_root() {
    local dir=$1 suite mirror
    shift
    mirror=$(debian_mirror)
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    : >"$dir/sources.list"
    for suite in "$@"; do
        echo "deb [signed-by=$KEYRING target=Packages] $mirror $suite main" >>"$dir/sources.list"
    done
    APT=(-o "Dir::Etc::sourcelist=$dir/sources.list" -o Dir::Etc::sourceparts=-
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache"
        -o APT::Sandbox::User=root -o Acquire::Languages=none)
}

# apt_update SUITES: updates the private lists that apt_root prepared (any error fails).
apt_update() {
    log "updating private apt lists ($1)"
    apt-get "${APT[@]}" --error-on=any update >&2
}

# version_ge A B: A >= B by version order.
version_ge() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]; }
