#!/bin/sh
# The image's entrypoint: `tandem "$@"`, with TLS unless TANDEM_TLS=off. With TANDEM_TLS=off the TLS flags
# (--tls-dir DIR, --client-name NAME, --require-client-cert) are dropped, with a warning in the log: every byte
# between the containers, bearer tokens included, is then plaintext.
set -e
if [ "${TANDEM_TLS:-on}" = off ]; then
  echo "WARNING: TANDEM_TLS=off: tandem $1 $2 runs WITHOUT TLS; traffic between the containers (tokens, hidden" \
       "states, gradients) is plaintext" >&2
  skip=0
  for a do
    shift
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    case "$a" in
      --tls-dir|--client-name) skip=1; continue ;;
      --tls-dir=*|--client-name=*|--require-client-cert) continue ;;
    esac
    set -- "$@" "$a"
  done
fi
exec "${TANDEM_EXE:-tandem}" "$@"
