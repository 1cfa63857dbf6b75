# The otp-router worker: consumes the queue, fires deadlines, serves webhooks,
# the API, /metrics and /healthz on port 8080.
#
#   docker build -t otp-router .
#   docker run --env-file .env -p 8080:8080 otp-router
#
# compose.yaml runs it with Redis, Prometheus and Grafana.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A user of its own: the worker needs no privileges.
RUN groupadd --system otp && useradd --system --gid otp --home-dir /app --shell /usr/sbin/nologin otp

WORKDIR /app
# Only what the package build needs (see .dockerignore); the wheel carries the assets.
COPY pyproject.toml README.md LICENSE CHANGELOG.md ./
COPY otp_router ./otp_router
RUN pip install ".[all]" && rm -rf /root/.cache

RUN mkdir -p /app/data && chown otp:otp /app/data

USER otp
# Listen on every interface inside the container. The SQLite default suits one container
# only; compose.yaml points the store (and with it the queue) at Redis.
ENV OTP_ROUTER_HTTP_HOST=0.0.0.0 \
    OTP_ROUTER_HTTP_PORT=8080 \
    OTP_ROUTER_STORE_URL=sqlite:////app/data/otp-router.db
VOLUME ["/app/data"]
EXPOSE 8080

# Fresh heartbeat of this container's worker (the worker name defaults to the host name).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["otp-router", "worker", "--check"]

ENTRYPOINT ["otp-router"]
CMD ["worker"]
