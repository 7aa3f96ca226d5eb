# Sourced by build-components.sh and doctor.sh: the toolchain that
# rust-toolchain.toml pins, and whether it has the components' target.
#
#   pinned_toolchain     prints the channel rust-toolchain.toml pins (e.g. 1.95.0)
#   has_wasm_target      true when that toolchain's sysroot holds wasm32-wasip2
#                        (read from the disk: `rustup target list` would install
#                        what is missing)
#   ensure_wasm_target   adds the target with rustup when it is missing
# Expects the current directory to be the repository.

WASM_TARGET=wasm32-wasip2

pinned_toolchain() {
  sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml
}

has_wasm_target() {
  local sysroot
  sysroot="$(rustc "+$(pinned_toolchain)" --print sysroot 2>/dev/null)" || return 1
  [ -d "$sysroot/lib/rustlib/$WASM_TARGET/lib" ]
}

ensure_wasm_target() {
  has_wasm_target && return 0
  local toolchain
  toolchain="$(pinned_toolchain)"
  command -v rustup >/dev/null 2>&1 || {
    echo "build-components: the $toolchain toolchain has no $WASM_TARGET target, and rustup is not here to add it" >&2
    return 1
  }
  echo "build-components: adding the $WASM_TARGET target to the $toolchain toolchain (rustup adds a toolchain file's targets only when it installs the toolchain)" >&2
  rustup target add "$WASM_TARGET" --toolchain "$toolchain"
  has_wasm_target || {
    echo "build-components: rustup added $WASM_TARGET, yet $toolchain's sysroot still lacks it" >&2
    return 1
  }
}
