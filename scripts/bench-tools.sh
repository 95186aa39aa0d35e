# Sourced by the benchmark scripts: `bench_tools NAME PROGRAM:PACKAGE...` installs with apt the
# packages whose program is missing (looked up in PATH and /usr/sbin), then stops the system
# services Debian's nginx and Varnish packages start: each benchmark runs its own copies on free
# loopback ports and must not leave anything running.

sudo_if_needed() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

bench_tools() {
    local name=$1 pair missing=()
    shift
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] ||
            missing+=("${pair#*:}")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    echo "$name: installing ${missing[*]}" >&2
    if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
        sudo_if_needed apt-get update
    fi
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" ||
        { sudo_if_needed apt-get update && sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"; }
    local svc
    for svc in nginx varnish varnishncsa; do
        sudo_if_needed service "$svc" stop >/dev/null 2>&1 || true
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            sudo_if_needed systemctl disable --now "$svc" >/dev/null 2>&1 || true
        fi
    done
}
