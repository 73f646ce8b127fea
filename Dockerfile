# quota-gw: the gateway, the sync worker, migrations and the demo upstream (one image, the
# command picks: `serve`, `worker`, `migrate`, `demo-upstream`). docker-compose.yml runs them all.

# Build the wheel (the Lua scripts and migrations are package data inside it).
FROM python:3.12-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# Run: the wheel and its runtime dependencies only (no dev, test or bench extras: no embedded
# Postgres or Valkey binaries; the demo upstream needs none of them), as a non-root user.
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --home-dir /var/lib/quota-gw --create-home quota-gw \
    && mkdir -p /var/lib/quota-gw/spool /etc/quota-gw \
    && chown -R quota-gw /var/lib/quota-gw
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm /tmp/*.whl
COPY examples/quota-gw.yaml /etc/quota-gw/quota-gw.yaml
ENV QUOTA_GW_CONFIG=/etc/quota-gw/quota-gw.yaml QUOTA_GW_SPOOL_DIR=/var/lib/quota-gw/spool
USER quota-gw
WORKDIR /var/lib/quota-gw
EXPOSE 8080 9091 9100
ENTRYPOINT ["quota-gw"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
