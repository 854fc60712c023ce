# Command-line options for recipe scripts, in the Kaldi / WeNet style.
#
# Source it after the script has given every option a default:
#
#     stage=0
#     stop_stage=100
#     nj=2
#     use_gpu=false
#     help_message="Usage: $0 [options] [args]"    # optional, printed by --help
#     . ../../tools/parse_options.sh    # from recipes/<task>/, as every run.sh does
#
# Then `run.sh --stage 1 --stop_stage 3 --use-gpu true` sets stage=1, stop_stage=3 and
# use_gpu=true. Rules:
#   --name value and --name=value are both accepted; dashes in a name become underscores.
#   Only variables that already exist can be set; any other --option is an error (exit 1).
#   A variable whose default is true or false accepts only true or false.
#   Option parsing stops at "--" (which is removed) or at the first argument that does not start
#   with "--"; what is left stays in "$@" for the script.
#   --help (or -h) prints help_message, then every variable the calling script assigned before
#   sourcing this file, with its default, and exits 0.
# Left out: arrays, short options other than -h, and Kaldi's --config file.
#
# Works under `set -euo pipefail`. Needs bash (indirect expansion and printf -v).

if [ -z "${BASH_VERSION:-}" ]; then
  echo "parse_options.sh: needs bash" >&2
  exit 1
fi

# Print the options of the calling script: names assigned at the start of a line in "$0" before
# it sources this file, with their current (default) values.
__po_print_help() {
  local script="$0" line name seen=" "
  if [ -n "${help_message:-}" ]; then
    printf '%s\n' "${help_message}"
  else
    printf 'Usage: %s [options] [args]\n' "${script}"
  fi
  # a recipe that cd's into its own folder first still finds itself by its file name
  [ -r "${script}" ] || script="$(basename "${script}")"
  if [ ! -r "${script}" ]; then
    return 0
  fi
  printf '\nOptions (default values):\n'
  __po_scan "${script}" 1
}

# Print the options assigned at the start of a line of file $1 (before it sources this file);
# with $2 = 1, also those of a file it sources first (". FILE", e.g. tools/launch_options.sh).
__po_scan() {
  local file="$1" nested="$2" line name
  while IFS= read -r line || [ -n "${line}" ]; do
    if [ "${nested}" = 1 ]; then
      case "${line}" in
        *parse_options.sh*) break ;;
      esac
    fi
    if [ "${nested}" = 1 ] && [[ "${line}" =~ ^[[:space:]]*(\.|source)[[:space:]]+([^[:space:]]+) ]]; then
      if [ -r "${BASH_REMATCH[2]}" ]; then
        printf '\n  (from %s)\n' "$(basename "${BASH_REMATCH[2]}")"
        __po_scan "${BASH_REMATCH[2]}" 0
        printf '\n'
      fi
      continue
    fi
    if [[ "${line}" =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)= ]]; then
      name="${BASH_REMATCH[1]}"
      case "${name}" in help_message) continue ;; esac
      case "${seen}" in *" ${name} "*) continue ;; esac
      seen="${seen}${name} "
      if [ -n "${!name+x}" ]; then
        if [ "${nested}" = 1 ]; then
          printf '  --%-24s %s\n' "${name}" "${!name}"
        else  # a shared file: its comment says what the option does
          printf '  --%-24s %-12s %s\n' "${name}" "${!name}" "$(sed -E 's/^[^#]*#? ?//' <<< "${line}")"
        fi
      fi
    fi
  done < "${file}"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h)
      __po_print_help
      exit 0
      ;;
    --)
      shift
      break
      ;;
    --*=*)
      __po_name="${1%%=*}"
      __po_value="${1#*=}"
      __po_nargs=1
      ;;
    --*)
      __po_name="$1"
      if [ $# -lt 2 ]; then
        echo "$0: option '$1' needs a value" >&2
        exit 1
      fi
      __po_value="$2"
      __po_nargs=2
      ;;
    *)
      break
      ;;
  esac
  __po_name="${__po_name#--}"
  __po_name="${__po_name//-/_}"
  if ! [[ "${__po_name}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    echo "$0: invalid option name '--${__po_name}'" >&2
    exit 1
  fi
  if [ -z "${!__po_name+x}" ]; then
    echo "$0: unknown option '--${__po_name}' (run '$0 --help' for the options)" >&2
    exit 1
  fi
  case "${!__po_name}" in
    true|false)
      case "${__po_value}" in
        true|false) ;;
        *)
          echo "$0: option '--${__po_name}' takes true or false, got '${__po_value}'" >&2
          exit 1
          ;;
      esac
      ;;
  esac
  printf -v "${__po_name}" '%s' "${__po_value}"
  shift "${__po_nargs}"
done

unset __po_name __po_value __po_nargs
unset -f __po_print_help __po_scan
true
