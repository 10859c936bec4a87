# Shared by scripts/test.sh and scripts/demo.sh (sourced, not run).

step() { printf '\n==== %s ====\n' "$*"; }

# Under sudo, root's PATH usually lacks the invoking user's ~/.cargo/bin.
find_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        for home in "${CARGO_HOME:-}" "${HOME:-/root}/.cargo" \
            "${SUDO_USER:+$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo}"; do
            if [ -n "$home" ] && [ -x "$home/bin/cargo" ]; then
                export PATH="$home/bin:$PATH"
                rustup_home="$(dirname "$home")/.rustup"
                if [ -z "${RUSTUP_HOME:-}" ] && [ -d "$rustup_home" ]; then
                    export RUSTUP_HOME="$rustup_home"
                fi
                break
            fi
        done
    fi
    command -v cargo >/dev/null 2>&1 || { echo "$1: error: cargo not found; install Rust (rustup) first" >&2; exit 1; }
}
