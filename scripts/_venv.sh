# Sourced by run.sh and test.sh: make .venv with the first Python that can, and install
# the project into it with the extras given as "$1" (e.g. "server" or "dev,server,django").
# The install is editable, so code changes need no reinstall: pip runs again only when
# pyproject.toml, the extras or the interpreter changed (a stamp file remembers them).
make_venv() {
  local py=${PYTHON:-python3}
  if [ ! -x .venv/bin/python ]; then
    if ! "$py" -m venv .venv 2>/dev/null; then
      # Debian's python3 lacks ensurepip without python3-venv; virtualenv needs nothing.
      rm -rf .venv
      "$py" -m pip install -q --user virtualenv 2>/dev/null \
        || "$py" -m pip install -q --user --break-system-packages virtualenv
      "$py" -m virtualenv -q .venv
    fi
  fi
  local stamp=".venv/.hypercacheio-install-${1//,/-}" want
  want="$( (cat pyproject.toml; echo "extras=$1"; .venv/bin/python -VV) | cksum)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
      && .venv/bin/python -c 'import hypercacheio' 2>/dev/null; then
    return 0  # nothing changed since the last install
  fi
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[$1]"
  echo "$want" > "$stamp"
}
