# Sourced by the scripts that run a pinned Python tool (fuzz-gateway.sh,
# interop-test.sh):
#
#   venv_install DIR PACKAGE==VERSION...   a venv in DIR holding exactly those
#                                          pins, installed once (a stamp names them)
venv_install() {
  local venv="$1"
  shift
  local stamp
  stamp="$venv/.installed-$(echo "$*" | sha256sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    echo "$(basename "$0"): installing $* into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
    touch "$stamp"
  fi
}
