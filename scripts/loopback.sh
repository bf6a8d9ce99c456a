#!/bin/sh
# Run a command inside a network namespace that has only loopback (ENVIRONMENT.md: Ray and
# other servers the tests start must talk over 127.0.0.1 and nothing else). Needs root
# (CI and the sessions have it); without it the command runs as is, with a warning.
if unshare -n true 2>/dev/null; then
    exec unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' "$@"
fi
echo "loopback.sh: cannot create a network namespace (not root?); running without one" >&2
exec "$@"
