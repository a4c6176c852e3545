# Sourced by the launch scripts: creates .venv if missing, installs the package (editable) with
# $EXTRAS, and activates it. Set PYTHON to choose the interpreter (3.11 or newer).
venv_dir="${VENV_DIR:-.venv}"
if [ ! -x "$venv_dir/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv_dir"
  "$venv_dir/bin/python" -m pip install --quiet --upgrade pip
fi
spec="."
[ -n "${EXTRAS:-}" ] && spec=".[${EXTRAS}]"
"$venv_dir/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
# shellcheck disable=SC1091
source "$venv_dir/bin/activate"
