# Sourced by the launch scripts that print commands to paste (dry runs).
# One word quoted for bash: as it is if it needs no quoting, else in single quotes; with control
# characters (a newline, a tab) as $'...' from printf %q, so that every command stays on one line.
quote() {
  local word=$1 q rest out=""
  printf -v q '%q' "$word"
  if [ "$q" = "$word" ] && [ -n "$word" ]; then printf '%s' "$word"; return; fi
  case "$word" in *[[:cntrl:]]*) printf '%s' "$q"; return ;; esac
  rest=$word
  while [[ "$rest" == *"'"* ]]; do out+="${rest%%"'"*}'\\''"; rest=${rest#*"'"}; done
  printf "'%s'" "$out$rest"
}
