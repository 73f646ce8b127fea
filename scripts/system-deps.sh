#!/bin/sh
# System packages the tests use but pip cannot bring: nginx, for tests/test_nginx.py (auth_request
# end to end). Installed only when missing, only as root with apt-get, and never fatal: without
# nginx that one test skips and says why.
set -u
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: nginx is missing (tests/test_nginx.py will skip); install nginx (Debian)" >&2
    exit 0
fi
# Installing must not start an nginx service on port 80: forbid service starts while we install,
# unless the machine already has a policy of its own.
policy=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && ours=1
fi
export DEBIAN_FRONTEND=noninteractive
timeout 300 apt-get update -qq >/dev/null 2>&1
timeout 300 apt-get install -y -qq --no-install-recommends nginx >/dev/null 2>&1 \
    || timeout 300 apt-get install -y -qq --no-install-recommends nginx-light >/dev/null 2>&1 \
    || echo "system-deps: could not install nginx (tests/test_nginx.py will skip)" >&2
[ -n "$ours" ] && rm -f "$policy"
exit 0
